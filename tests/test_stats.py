"""Second-moment statistics: one pass over many layers equals a brute-force per-layer computation."""

import pytest
import torch

from editlib.data.corpus import load_corpus
from editlib.editing.statistics import (
    StatisticsError,
    StatsConfig,
    accumulate_upper_gram,
    collect_second_moments,
    layer_second_moments,
    load_moments,
    save_moments,
    symmetric_from_upper,
)
from editlib.io import write_jsonl
from editlib.model.layout import model_layout


def brute_force(model, tokenizer, module_name, texts):
    """sum over every token of every text (one text per forward) of k k^T, / count."""
    store = {}
    handle = model.get_submodule(module_name).register_forward_pre_hook(lambda m, a: store.__setitem__("k", a[0]))
    total, count = None, 0
    try:
        for text in texts:
            model(input_ids=torch.tensor([tokenizer(text)["input_ids"]]))
            k = store["k"][0].double()
            total = k.T @ k if total is None else total + k.T @ k
            count += k.shape[0]
    finally:
        handle.remove()
    return total / count, count


@pytest.mark.parametrize("model_fixture, tok_fixture", [("tiny_llama", "llama_tokenizer"), ("tiny_gpt2", "gpt2_tokenizer")])
def test_one_pass_equals_per_layer_brute_force(request, model_fixture, tok_fixture, corpus):
    model, tok = request.getfixturevalue(model_fixture), request.getfixturevalue(tok_fixture)
    layout = model_layout(model)
    texts = corpus[:40]
    moments = collect_second_moments(model, tok, layout, [0, 2], texts, StatsConfig(batch_tokens=256), progress=False)
    for layer in (0, 2):
        expected, count = brute_force(model, tok, layout.rewrite(layer), texts)
        assert moments[layer].count == count
        assert moments[layer].total.dtype == torch.float32
        torch.testing.assert_close(moments[layer].mean.double(), expected, rtol=1e-5, atol=1e-6)


def test_cache_hit_needs_no_forward_and_corruption_recomputes(tiny_llama, llama_tokenizer, corpus, tmp_path, monkeypatch):
    layout = model_layout(tiny_llama)
    path = tmp_path / "wiki.jsonl"
    write_jsonl(path, [{"text": t} for t in corpus[:30]])
    docs = load_corpus(str(path), n_samples=20, seed=1)
    config = StatsConfig(batch_tokens=512)
    first = layer_second_moments(tiny_llama, llama_tokenizer, layout, [0, 1], docs, tmp_path / "cache", config, False)
    files = sorted((tmp_path / "cache").glob("*.safetensors"))
    assert len(files) == 2

    calls = []
    original_forward = tiny_llama.forward
    monkeypatch.setattr(tiny_llama, "forward", lambda *a, **k: calls.append(1) or original_forward(*a, **k))
    second = layer_second_moments(tiny_llama, llama_tokenizer, layout, [0, 1], docs, tmp_path / "cache", config, False)
    assert calls == []
    for layer in (0, 1):
        assert torch.equal(first[layer].total, second[layer].total) and first[layer].count == second[layer].count

    files[0].write_bytes(files[0].read_bytes()[:100])  # truncate: a corrupt cache file
    third = layer_second_moments(tiny_llama, llama_tokenizer, layout, [0, 1], docs, tmp_path / "cache", config, False)
    assert len(calls) == 1  # only the corrupt layer was recomputed, in one pass
    for layer in (0, 1):
        assert torch.equal(first[layer].total, third[layer].total)


def test_cache_key_changes_with_corpus_and_model(tiny_llama, llama_tokenizer, corpus, tmp_path):
    layout = model_layout(tiny_llama)
    path = tmp_path / "wiki.jsonl"
    write_jsonl(path, [{"text": t} for t in corpus[:30]])
    cache = tmp_path / "cache"
    layer_second_moments(tiny_llama, llama_tokenizer, layout, [0], load_corpus(str(path), 10), cache, progress=False)
    layer_second_moments(tiny_llama, llama_tokenizer, layout, [0], load_corpus(str(path), 12), cache, progress=False)
    with torch.no_grad():
        tiny_llama.model.layers[0].mlp.up_proj.weight.mul_(1.01)
    layer_second_moments(tiny_llama, llama_tokenizer, layout, [0], load_corpus(str(path), 12), cache, progress=False)
    assert len(list(cache.glob("*.safetensors"))) == 3


def test_half_precision_model_accumulates_in_fp32(llama_tokenizer, corpus):
    from conftest import make_llama

    model = make_llama(llama_tokenizer).to(torch.bfloat16)
    moments = collect_second_moments(model, llama_tokenizer, model_layout(model), [1], corpus[:10], progress=False)
    assert moments[1].total.dtype == torch.float32 and torch.isfinite(moments[1].total).all()


def test_nan_statistics_raise(tiny_llama, llama_tokenizer, corpus):
    with torch.no_grad():
        tiny_llama.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(StatisticsError, match="layer 0.*non-finite"):
        collect_second_moments(tiny_llama, llama_tokenizer, model_layout(tiny_llama), [0], corpus[:5], progress=False)


def test_moments_file_round_trip(tiny_llama, llama_tokenizer, corpus, tmp_path):
    moments = collect_second_moments(tiny_llama, llama_tokenizer, model_layout(tiny_llama), [0, 2], corpus[:5], progress=False)
    save_moments(tmp_path / "m.safetensors", moments)
    loaded = load_moments(tmp_path / "m.safetensors")
    assert sorted(loaded) == [0, 2]
    torch.testing.assert_close(loaded[2], moments[2].mean)


@pytest.mark.parametrize("width", [100, 300, 1030])
def test_upper_triangle_accumulation_equals_full_gram(width):
    torch.manual_seed(0)
    total = torch.zeros(width, width, dtype=torch.float64)
    parts = [torch.randn(n, width, dtype=torch.float64) for n in (7, 50, 1)]
    for feats in parts:
        accumulate_upper_gram(total, feats)
    everything = torch.cat(parts)
    torch.testing.assert_close(symmetric_from_upper(total), everything.T @ everything, rtol=1e-12, atol=1e-10)


# ---------------------------------------------------------------------------- memory: one capture alive, layer groups


def test_each_layer_input_is_freed_before_the_next_layer_runs(tiny_llama, llama_tokenizer, corpus):
    """Only the layer being accumulated holds its input: when the deepest layer's module is
    reached, the inputs of the shallower layers of the same batch are gone."""
    import weakref

    layout = model_layout(tiny_llama)
    refs, alive_at_deepest = {}, []

    def remember(layer):
        def hook(module, args):
            refs[layer] = weakref.ref(args[0])
            if layer == 2:
                alive_at_deepest.append([l for l in (0, 1) if refs[l]() is not None])
        return hook

    handles = [tiny_llama.get_submodule(layout.rewrite(l)).register_forward_pre_hook(remember(l)) for l in (0, 1, 2)]
    try:
        collect_second_moments(tiny_llama, llama_tokenizer, layout, [0, 1, 2], corpus[:30],
                               StatsConfig(batch_tokens=128), progress=False)
    finally:
        for handle in handles:
            handle.remove()
    assert len(alive_at_deepest) > 1  # several batches
    assert alive_at_deepest == [[]] * len(alive_at_deepest)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_layer_groups_equal_one_pass_bit_for_bit(tiny_llama, llama_tokenizer, corpus, monkeypatch, dtype):
    layout = model_layout(tiny_llama)
    forwards = []
    original_forward = tiny_llama.forward
    monkeypatch.setattr(tiny_llama, "forward", lambda *a, **k: forwards.append(1) or original_forward(*a, **k))
    texts = corpus[:60]
    one = collect_second_moments(tiny_llama, llama_tokenizer, layout, [2, 0, 1], texts,
                                 StatsConfig(batch_tokens=200, dtype=dtype), progress=False)
    n_batches = len(forwards)
    assert n_batches > 1
    for per_pass, passes in ((1, 3), (2, 2)):
        forwards.clear()
        grouped = collect_second_moments(tiny_llama, llama_tokenizer, layout, [2, 0, 1], texts,
                                         StatsConfig(batch_tokens=200, dtype=dtype, layers_per_pass=per_pass), progress=False)
        assert len(forwards) == passes * n_batches  # one pass over the corpus per group
        assert list(grouped) == [2, 0, 1]
        for layer in (0, 1, 2):
            assert grouped[layer].count == one[layer].count
            assert grouped[layer].total.dtype == getattr(torch, dtype)
            assert torch.equal(grouped[layer].total, one[layer].total)


def test_cuda_group_size_follows_the_free_memory(tiny_llama, llama_tokenizer, monkeypatch):
    """On CUDA (here: a device reporting `available` bytes) and without layers_per_pass, the
    group is what statistics_memory fits; on CPU all layers; layers_per_pass wins."""
    import editlib.editing.statistics as stats
    from editlib.editing.statistics_memory import statistics_memory

    layout = model_layout(tiny_llama)
    d_k, hidden = tiny_llama.config.intermediate_size, tiny_llama.config.hidden_size
    model_bytes = sum(p.numel() * p.element_size() for p in (*tiny_llama.parameters(), *tiny_llama.buffers()))
    config = StatsConfig(batch_tokens=256)
    assert stats.layers_per_pass(tiny_llama, layout, 3, config) == 3  # CPU: one pass
    fixed = dict(intermediate_size=d_k, hidden_size=hidden, n_layers=3, batch_tokens=256, model_bytes=model_bytes)
    base = statistics_memory(**fixed, available_bytes=10**12)
    for fit in (1, 2):  # memory for exactly `fit` accumulators beside the rest
        available = int((base.model_bytes + fit * base.gram_bytes + base.capture_bytes + base.activation_bytes + 1) / 0.9) + 1
        monkeypatch.setattr(stats, "device_memory_available", lambda device, a=available: a)
        assert stats.layers_per_pass(tiny_llama, layout, 3, config) == fit
        assert stats.layers_per_pass(tiny_llama, layout, 3, StatsConfig(batch_tokens=256, layers_per_pass=3)) == 3


def test_statistics_memory_of_llama3_8b():
    from editlib.editing.statistics_memory import statistics_memory
    from editlib.model.architectures import HUB_ARCHITECTURES, parameter_count

    arch = HUB_ARCHITECTURES["meta-llama/Meta-Llama-3-8B"]
    model_bytes = parameter_count(arch) * 4
    common = dict(intermediate_size=14336, hidden_size=4096, n_layers=32, batch_tokens=16384, model_bytes=model_bytes)
    plan = statistics_memory(**common)  # CPU: all layers, one pass
    assert (plan.group_size, plan.passes) == (32, 1)
    assert plan.gram_bytes == 14336 * 14336 * 4  # 822 MB
    assert plan.capture_bytes == 16384 * 14336 * 4  # fp32 model, fp32 sums: one copy
    assert plan.peak_bytes == model_bytes + 32 * plan.gram_bytes + plan.capture_bytes + plan.activation_bytes
    h100 = 80 * 10**9
    fp32 = statistics_memory(**common, available_bytes=h100)
    assert fp32.group_size == 32 and fp32.peak_bytes < h100  # fits in one pass
    fp64 = statistics_memory(**common, acc_dtype="float64", available_bytes=h100)
    assert fp64.gram_bytes == 2 * fp32.gram_bytes and 1 <= fp64.group_size < 32 and fp64.peak_bytes <= 0.9 * h100
    assert fp64.passes == -(-32 // fp64.group_size)
    assert statistics_memory(**common, available_bytes=h100, layers_per_pass=5).group_size == 5
    bf16 = statistics_memory(**{**common, "model_bytes": model_bytes // 2}, model_dtype="bfloat16")
    assert bf16.capture_bytes == 16384 * 14336 * (2 + 4)  # the masked bf16 input and its fp32 copy
    with pytest.raises(ValueError, match="acc_dtype 'float8'"):
        statistics_memory(**common, acc_dtype="float8")
    with pytest.raises(ValueError, match="layers_per_pass must be >= 1"):
        statistics_memory(**common, layers_per_pass=0)


# ---------------------------------------------------------------------------- precision of the accumulation


@pytest.fixture
def tf32_setting():
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    yield matmul
    matmul.fp32_precision = before


@pytest.mark.parametrize("api", ["new", "legacy"])
def test_full_precision_matmul_disables_tf32_and_restores(tf32_setting, api):
    from editlib.model.loading import full_precision_matmul

    if api == "new":
        tf32_setting.fp32_precision = "tf32"
    else:
        tf32_setting.allow_tf32 = True
    with full_precision_matmul():
        assert tf32_setting.fp32_precision == "ieee"
    assert tf32_setting.fp32_precision == "tf32"
    if api == "legacy":
        assert tf32_setting.allow_tf32 is True  # the legacy flag stays readable and set
    with pytest.raises(RuntimeError, match="inside"), full_precision_matmul():
        raise RuntimeError("inside")
    assert tf32_setting.fp32_precision == "tf32"


def test_gram_accumulates_without_tf32_while_the_model_may_use_it(tiny_llama, llama_tokenizer, corpus, tf32_setting,
                                                                  monkeypatch):
    import editlib.editing.statistics as stats

    seen = []
    original = stats.accumulate_upper_gram
    monkeypatch.setattr(stats, "accumulate_upper_gram",
                        lambda total, feats: seen.append(torch.backends.cuda.matmul.fp32_precision) or original(total, feats))
    tf32_setting.fp32_precision = "tf32"
    collect_second_moments(tiny_llama, llama_tokenizer, model_layout(tiny_llama), [0, 1], corpus[:10], progress=False)
    assert seen and set(seen) == {"ieee"}
    assert tf32_setting.fp32_precision == "tf32"


# ---------------------------------------------------------------------------- reading only the layers a job edits


def test_load_moments_reads_only_the_requested_layers(tiny_llama, llama_tokenizer, corpus, tmp_path, monkeypatch):
    import safetensors

    moments = collect_second_moments(tiny_llama, llama_tokenizer, model_layout(tiny_llama), [0, 1, 2], corpus[:5],
                                     progress=False)
    path = tmp_path / "m.safetensors"
    save_moments(path, moments)
    real_open, read = safetensors.safe_open, []

    class CountingOpen:
        def __init__(self, *args, **kwargs):
            self.handle = real_open(*args, **kwargs)

        def __enter__(self):
            self.inner = self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def get_tensor(self, name):
            read.append(name)
            return self.inner.get_tensor(name)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr(safetensors, "safe_open", CountingOpen)
    loaded = load_moments(path, [2])
    assert sorted(loaded) == [2] and read == ["layer.2"]
    torch.testing.assert_close(loaded[2], moments[2].mean)
    with pytest.raises(ValueError, match=r"m\.safetensors: no statistics for layers \[5\] \(it holds layers \[0, 1, 2\]\)"):
        load_moments(path, [2, 5])


def test_a_damaged_unrelated_layer_does_not_stop_a_job(tmp_path):
    from editlib.io import save_tensors

    good = torch.eye(4)
    path = tmp_path / "m.safetensors"
    save_tensors(path, {"layer.0": good, "layer.1": torch.full((4, 4), float("nan"))}, {"counts": "{}"})
    assert torch.equal(load_moments(path, [0])[0], good)
    with pytest.raises(StatisticsError, match="layer 1"):
        load_moments(path)


def test_a_failed_later_pass_keeps_the_earlier_groups_cached(tiny_llama, llama_tokenizer, corpus, tmp_path, monkeypatch):
    import editlib.editing.statistics as stats

    layout = model_layout(tiny_llama)
    docs = load_corpus_from(corpus[:20], tmp_path)
    config = StatsConfig(batch_tokens=256, layers_per_pass=1)
    real_pass, passes = stats._accumulate_pass, []

    def failing_second(*args, **kwargs):
        passes.append(args[2])
        if len(passes) == 2:
            raise KeyboardInterrupt  # the job is killed during the second pass
        return real_pass(*args, **kwargs)

    monkeypatch.setattr(stats, "_accumulate_pass", failing_second)
    with pytest.raises(KeyboardInterrupt):
        layer_second_moments(tiny_llama, llama_tokenizer, layout, [0, 2], docs, tmp_path / "cache", config, False)
    assert passes == [[0], [2]]
    assert [p.name.split(".")[2] for p in (tmp_path / "cache").glob("*.safetensors")] == ["0"]  # model.layers.0...
    passes.clear()
    monkeypatch.setattr(stats, "_accumulate_pass", lambda *a, **k: passes.append(a[2]) or real_pass(*a, **k))
    layer_second_moments(tiny_llama, llama_tokenizer, layout, [0, 2], docs, tmp_path / "cache", config, False)
    assert passes == [[2]]  # the rerun collects only what is missing


def load_corpus_from(texts, tmp_path):
    path = tmp_path / "wiki.jsonl"
    write_jsonl(path, [{"text": t} for t in texts])
    return load_corpus(str(path), n_samples=len(texts), seed=1)


def test_the_memory_plan_imports_no_torch():
    """A resource plan can size the statistics job without torch."""
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, editlib.editing.statistics_memory; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
