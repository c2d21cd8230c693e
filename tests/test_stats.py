"""Second-moment statistics: one pass over many layers equals a brute-force per-layer computation."""

import pytest
import torch

from editlib.corpus import load_corpus
from editlib.io import write_jsonl
from editlib.models import model_layout
from editlib.stats import (
    StatisticsError,
    StatsConfig,
    accumulate_upper_gram,
    collect_second_moments,
    layer_second_moments,
    load_moments,
    save_moments,
    symmetric_from_upper,
)


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
