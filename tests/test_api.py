"""The Python API (editlib/api.py): every method through open_editor on a tiny Llama (apply,
evaluate, restore to the original weights exactly, save and reload bit-identically), the
requests' and sessions' errors, the statistics cache; and (slow) the README's "## Python API"
code block executed exactly as written, offline, against a local Hugging Face Hub serving the
SmolLM2-135M-Instruct asset and a stand-in of the corpus dataset."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import make_llama

import editlib
from editlib.data.records import EditRequest, RecordError

REPO = Path(__file__).resolve().parents[1]
MARKER = "## Python API"
DOCUMENTS = (REPO / "README.md",)

TARGETS = {"clamp_norm_factor": 20.0, "v_num_grad_steps": 20, "v_weight_decay": 1e-3, "v_lr": 0.5}
METHODS = {  # method -> (layers, hyperparameters) for the tiny 2-layer model
    "rome": ((0,), {"targets": TARGETS, "context_lengths": [[5, 2]]}),
    "r-rome": ((0,), {"targets": TARGETS, "context_lengths": [[5, 2]]}),
    "memit": ((0, 1), {"targets": TARGETS, "mom2_update_weight": 1.0, "context_lengths": [[5, 2]]}),
    "emmet": ((1,), {"targets": TARGETS, "mom2_update_weight": 1.0, "context_lengths": [[5, 2]]}),
    "alphaedit": ((0, 1), {"targets": TARGETS, "l2": 1.0, "context_lengths": [[5, 2]]}),
    "grace": ((1,), {"n_iter": 10}),
    "mend": (None, {}),
}


def requests():
    """Prompts that end with the subject: in a 2-layer model the edited token is the predicting one."""
    return [
        editlib.Request("I met Danielle Darrieux", "Danielle Darrieux", "guitar", target_true="French",
                        paraphrase_prompts=["Yes. Danielle Darrieux"], neighborhood_prompts=["I met Marcel Proust"]),
        editlib.Request("Toko Yasuda", "Toko Yasuda", "Berlin", target_true="Paris", neighborhood_prompts=["Kotor"]),
    ]


def weights(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def probe_logits(model, tokenizer, session) -> torch.Tensor:
    """Last-position logits of the edit prompts as generation sees them (GRACE: queried there)."""
    texts = [r.edit_request(i).text for i, r in enumerate(requests())]
    with session.scoring(requests()), torch.no_grad():
        return torch.stack([model(**tokenizer(text, return_tensors="pt")).logits[0, -1] for text in texts])


@pytest.fixture
def fresh_model(llama_tokenizer, trained_llama2_state):
    def build():
        model = make_llama(llama_tokenizer, layers=2)
        model.load_state_dict(trained_llama2_state)
        return model

    return build


@pytest.fixture
def stats(tmp_path, fresh_model, llama_tokenizer, corpus):
    return editlib.second_moments(fresh_model(), llama_tokenizer, [0, 1], corpus, cache_dir=tmp_path / "stats",
                                  progress=False)


@pytest.fixture
def mend_editor(tmp_path, fresh_model, llama_tokenizer):
    """An untrained MEND hypernetwork (one plain gradient step per edit) saved as a trained one."""
    from editlib.methods.mend import MendHparams
    from editlib.methods.mend.editor import MendEditor

    path = tmp_path / "mend.safetensors"
    modules = ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj")
    MendEditor.fresh(fresh_model(), llama_tokenizer, MendHparams(modules=modules, rank=8, edit_lr=0.5)).save(path)
    return path


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_edits_restores_and_reloads_bit_identically(method, tmp_path, fresh_model, llama_tokenizer,
                                                                   stats, mend_editor):
    layers, hyperparameters = METHODS[method]
    extra = {"trained_editor": mend_editor} if method == "mend" else {}
    model = fresh_model()
    original = weights(model)
    session = editlib.open_editor(model, llama_tokenizer, method, layers, second_moments=stats, progress=False,
                                  **extra, **hyperparameters)
    assert isinstance(session, editlib.Session) and session.method == method
    logits_before = probe_logits(model, llama_tokenizer, session)
    before = editlib.evaluate(model, llama_tokenizer, requests())
    assert set(before) == {"ES", "PS", "NS", "S", "EM", "PM", "NM"}

    session.apply(requests())
    assert session.n_edits == 2
    after = editlib.evaluate(model, llama_tokenizer, requests())
    edited = weights(model)
    logits_edited = probe_logits(model, llama_tokenizer, session)
    assert not torch.equal(logits_edited, logits_before)
    assert after["EM"] > before["EM"], (before, after)
    assert same(edited, original) == (method == "grace")  # GRACE adds a codebook, the weights stay
    path = session.save(tmp_path / "edit.safetensors")

    session.restore()
    assert session.n_edits == 0 and same(weights(model), original)
    assert torch.equal(probe_logits(model, llama_tokenizer, session), logits_before)
    assert editlib.evaluate(model, llama_tokenizer, requests()) == before

    session.load(path)  # the same session again
    assert session.n_edits == 2 and same(weights(model), edited)
    assert torch.equal(probe_logits(model, llama_tokenizer, session), logits_edited)
    session.close()
    assert same(weights(model), original)

    fresh = fresh_model()  # a fresh copy of the unedited model
    reloaded = editlib.load_edit(fresh, llama_tokenizer, path, second_moments=stats, progress=False)
    assert reloaded.method == method and reloaded.layers == session.layers and reloaded.n_edits == 2
    assert same(weights(fresh), edited)
    assert torch.equal(probe_logits(fresh, llama_tokenizer, reloaded), logits_edited)
    assert editlib.evaluate(fresh, llama_tokenizer, requests()) == after
    reloaded.apply(requests()[:1])  # and it edits on top
    assert reloaded.n_edits == 3
    reloaded.close()


def test_request_locates_the_subject_and_names_a_bad_request():
    request = editlib.Request("The Eiffel Tower is in", "Eiffel Tower", "Rome", target_true="Paris",
                              paraphrase_prompts="Where is the Eiffel Tower? In", case_id="tower")
    converted = request.edit_request()
    assert converted == EditRequest(case_id="tower", prompt="The {} is in", subject="Eiffel Tower", target_new="Rome",
                                    target_true="Paris", paraphrase_prompts=("Where is the Eiffel Tower? In",))
    assert converted.text == "The Eiffel Tower is in"
    assert editlib.Request("x {} y", "s", "t").edit_request(4).prompt == "x {} y"  # a template is taken as it is
    assert editlib.Request("a b", "b", "t").edit_request(4).source == "zsre"  # no target_true: token accuracy
    with pytest.raises(RecordError, match=r"Request\(case_id=7, prompt='The Eiffel Tower is in', subject='Eifel'\).*"
                                          r"does not occur in the prompt"):
        editlib.Request("The Eiffel Tower is in", "Eifel", "Rome", case_id=7)
    with pytest.raises(RecordError, match="identical"):
        editlib.Request("The Eiffel Tower is in", "Eiffel Tower", "Paris", target_true="Paris")
    with pytest.raises(RecordError, match="braces"):
        editlib.Request("The {Eiffel} Tower is in", "Tower", "Rome")
    with pytest.raises(ValueError, match="case_id 1"):
        editlib.api.edit_requests([editlib.Request("a b", "b", "c", case_id=1), editlib.Request("a b", "b", "d", case_id=1)])


def test_sessions_say_what_is_missing(fresh_model, llama_tokenizer, stats, mend_editor):
    model = fresh_model()
    short = {"context_lengths": [[5, 1]], "progress": False}
    with pytest.raises(editlib.MissingStatisticsError, match=r"editlib.second_moments\(model, tokenizer, \[0, 1\]"):
        editlib.open_editor(model, llama_tokenizer, "memit", [0, 1], **short)
    with pytest.raises(editlib.MissingStatisticsError, match=r"layers \[1\]"):
        editlib.open_editor(model, llama_tokenizer, "alphaedit", [0, 1], second_moments={0: stats[0]}, **short)
    with pytest.raises(ValueError, match="trained_editor"):
        editlib.open_editor(model, llama_tokenizer, "mend")
    with pytest.raises(ValueError, match="pass layers"):
        editlib.open_editor(model, llama_tokenizer, "grace")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        editlib.open_editor(model, llama_tokenizer, "nope", [1])
    with pytest.raises(ValueError, match="one layer"):
        editlib.open_editor(model, llama_tokenizer, "rome", second_moments=stats)  # layers 0 and 1 from C
    # ROME without the covariance adjustment needs no statistics
    editlib.open_editor(model, llama_tokenizer, "rome", [1], mom2_adjustment=False, **short).close()


def test_a_saved_edit_loads_only_onto_its_own_unedited_model(tmp_path, fresh_model, llama_tokenizer, stats):
    model = fresh_model()
    session = editlib.open_editor(model, llama_tokenizer, "memit", [0, 1], stats, progress=False, targets=TARGETS)
    session.apply(requests()[:1])
    path = session.save(tmp_path / "edit.safetensors")
    other = editlib.open_editor(model, llama_tokenizer, "memit", [0, 1], stats, progress=False)  # on the edited model
    with pytest.raises(ValueError, match="fingerprint"):
        other.load(path)
    with pytest.raises(ValueError, match=r"memit on layers \[0, 1\]; this session is emmet"):
        editlib.open_editor(fresh_model(), llama_tokenizer, "emmet", [0, 1], stats, progress=False).load(path)
    session.close()


def test_evaluate_without_target_true_reports_token_accuracy(tiny_llama, llama_tokenizer):
    plain = [editlib.Request("Toko Yasuda is a citizen of", "Toko Yasuda", "London",
                             neighborhood_prompts=["Kotor is a citizen of"], neighborhood_answers=["Paris"])]
    metrics = editlib.evaluate(tiny_llama, llama_tokenizer, plain)
    assert set(metrics) == {"ES", "NS"} and all(0 <= value <= 100 for value in metrics.values())
    per_request = editlib.evaluate(tiny_llama, llama_tokenizer, plain, per_request=True)
    assert list(per_request.columns) == ["ES", "NS"] and len(per_request) == 1
    with pytest.raises(ValueError, match="target_true"):
        editlib.evaluate(tiny_llama, llama_tokenizer, [*plain, *requests()])


def test_second_moments_are_cached_by_content(tmp_path, monkeypatch, fresh_model, llama_tokenizer, corpus):
    import editlib.data.corpus as corpus_module
    import editlib.editing.statistics as statistics
    from editlib.editing.statistics import collect_second_moments

    model = fresh_model()
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"text": text}) + "\n" for text in corpus[:300]))
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[3])  # the layers collected
        return collect_second_moments(*args, **kwargs)

    monkeypatch.setattr(statistics, "collect_second_moments", counted)
    cache = tmp_path / "cache"
    first = editlib.second_moments(model, llama_tokenizer, [0, 1], jsonl, n_samples=200, cache_dir=cache, progress=False)
    assert calls == [[0, 1]] and set(first) == {0, 1} and first[0].shape == (128, 128)
    second = editlib.second_moments(model, llama_tokenizer, [1, 0], jsonl, n_samples=200, cache_dir=cache, progress=False)
    assert calls == [[0, 1]] and all(torch.equal(first[layer], second[layer]) for layer in (0, 1))
    editlib.second_moments(model, llama_tokenizer, 1, jsonl, n_samples=100, cache_dir=cache, progress=False)
    assert calls[1:] == [[1]]  # another sample: computed again
    texts = editlib.second_moments(model, llama_tokenizer, [0], corpus[:200], cache_dir=cache, progress=False)
    again = editlib.second_moments(model, llama_tokenizer, [0], corpus[:200] + ["  "], cache_dir=cache, progress=False)
    assert calls[2:] == [[0]] and torch.equal(texts[0], again[0])  # blank documents are skipped

    # a hub dataset is sampled once; later calls read the sample from the cache
    sampled = []

    def sample_hf(spec, n, seed, text_field="text", progress=True):
        sampled.append(spec)
        return corpus_module.corpus_of(spec, corpus[:n])

    monkeypatch.setattr(corpus_module, "sample_hf", sample_hf)
    hub = [editlib.second_moments(model, llama_tokenizer, [0], "hf:org/texts::train", n_samples=50, cache_dir=cache,
                                  progress=False) for _ in range(2)]
    assert sampled == ["hf:org/texts::train"] and calls[3:] == [[0]] and torch.equal(hub[0][0], hub[1][0])
    with pytest.raises(ValueError, match="n_samples"):
        editlib.second_moments(model, llama_tokenizer, [0], "hf:org/texts", cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="corpus file not found"):
        editlib.second_moments(model, llama_tokenizer, [0], tmp_path / "missing.jsonl", cache_dir=cache)


def test_import_editlib_stays_torch_free():
    code = ("import sys, editlib, editlib.study.config\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "assert {'Request', 'open_editor', 'second_moments'} <= set(dir(editlib))\n"
            "editlib.Request\n"
            "assert 'torch' in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------- the README's code block


def api_block() -> tuple[Path, str]:
    """The ```python block of README.md's "## Python API" section."""
    for path in DOCUMENTS:
        if not path.is_file():
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        if MARKER not in lines:
            continue
        start = lines.index(MARKER) + 1
        end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
        section = lines[start:end]
        if "```python" in section:
            opening = section.index("```python")
            closing = section.index("```", opening + 1)
            return path, "\n".join(section[opening + 1:closing]) + "\n"
    raise AssertionError(f"no {MARKER!r} section with a ```python block in {[str(p) for p in DOCUMENTS]}")


def test_the_python_api_section_is_short_and_its_block_parses():
    path, block = api_block()
    lines = path.read_text(encoding="utf-8").splitlines()
    start = lines.index(MARKER)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    assert end - start <= 45, f"{path}: the {MARKER} section has {end - start} lines"
    tree = ast.parse(block)
    calls = {node.func.attr for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
    assert {"load_model", "second_moments", "evaluate", "open_editor", "apply", "restore", "save", "load_edit"} <= calls


# What the runner checks after executing the block (in the block's namespace): restore gave the
# weights of a freshly loaded model exactly; re-applying the saved edit gives `fresh`'s weights
# exactly, and those differ from the original in the edited layers' weights only; the edit worked;
# the block's second_moments call, repeated on the restored model, loads from the cache (no corpus
# streaming, no pass over it).
RUNNER = textwrap.dedent('''
    import ast, json, sys, time
    import torch
    block = open(sys.argv[1], encoding="utf-8").read()
    namespace = {"__name__": "__main__"}
    start = time.perf_counter()
    exec(compile(block, sys.argv[2], "exec"), namespace)
    seconds = time.perf_counter() - start
    import editlib, editlib.editing.statistics as statistics, editlib.data.corpus as corpus
    from editlib.model.layout import model_layout
    ns = namespace
    def refuse(*args, **kwargs):
        raise AssertionError("the second call recomputed or re-sampled")
    statistics.collect_second_moments = refuse
    corpus.sample_hf = refuse
    call = next(node for node in ast.parse(block).body if isinstance(node, ast.Assign)
                and ast.get_source_segment(block, node.value).split("(")[0].endswith("second_moments"))
    start_cached = time.perf_counter()
    exec("again_C = " + ast.get_source_segment(block, call.value), ns)
    cached = time.perf_counter() - start_cached
    same_C = all(torch.equal(ns["again_C"][layer], ns["C"][layer]) for layer in ns["layers"])
    clean, _ = editlib.load_model(ns["name"])
    original, fresh = clean.state_dict(), ns["fresh"].state_dict()
    restored = all(torch.equal(t, original[k]) for k, t in ns["model"].state_dict().items())
    ns["editor"].load("edit.safetensors")
    reloaded = all(torch.equal(t, fresh[k]) for k, t in ns["model"].state_dict().items())
    layout = model_layout(clean)
    edited = {f"{layout.rewrite(layer)}.weight" for layer in ns["layers"]}
    changed = sorted(k for k, t in fresh.items() if not torch.equal(t, original[k]))
    print(json.dumps({"restored": restored, "reloaded": reloaded, "changed": changed, "edited": sorted(edited),
                      "before": ns["before"], "after": ns["after"], "same_C": same_C,
                      "seconds": seconds, "cached_seconds": cached}))
''')


def wikitext_standin_rows() -> list[dict]:
    """Rows shaped like wikitext-2's (blank lines, " = Heading = " lines, paragraphs), the
    paragraphs taken from this repository's documentation: real English prose, offline."""
    rows = []
    for path in sorted((REPO / "docs").glob("*.md")):
        for paragraph in path.read_text(encoding="utf-8").split("\n\n"):
            paragraph = " ".join(paragraph.split())
            if paragraph.startswith("#"):
                rows += [{"text": ""}, {"text": f" = {paragraph.lstrip('# ')} = \n"}, {"text": ""}]
            elif len(paragraph) > 80 and not paragraph.startswith(("|", "```")):
                rows.append({"text": f" {paragraph[:240]} \n"})
    return rows


def serve_files(source: Path, repo: Path) -> None:
    """The files of folder `source` (not its asset manifest) as repository folder `repo`, linked."""
    repo.mkdir(parents=True)
    for file in source.iterdir():
        if file.is_file() and file.name != "asset_manifest.json":
            (repo / file.name).symlink_to(file.resolve())


@pytest.mark.slow
def test_the_readme_python_api_block_runs_as_written(tmp_path):
    from test_assets import ASSET_CACHE, real_asset

    from editlib.data.packaged import prepare_smollm2
    from editlib.study.rehearsal.hub import LocalHub
    from editlib.study.rehearsal.standins import write_dataset_repo

    source, block = api_block()
    model_dir = real_asset(prepare_smollm2, ASSET_CACHE, ASSET_CACHE / "smollm2-hf")  # converted once, then reused
    root = tmp_path / "hub"
    serve_files(model_dir, root / "models" / "HuggingFaceTB" / "SmolLM2-135M-Instruct")
    write_dataset_repo(root / "datasets" / "Salesforce" / "wikitext", {"wikitext-2-raw-v1": {"train": wikitext_standin_rows()}},
                       [{"name": "text", "dtype": "string"}])
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "block.py").write_text(block, encoding="utf-8")
    (tmp_path / "runner.py").write_text(RUNNER, encoding="utf-8")
    hf = tmp_path / "hf"
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("HF_", "HUGGING_FACE_")) and key not in ("TRANSFORMERS_OFFLINE", "EDITLIB_CACHE")}
    with LocalHub(root) as hub:
        env.update(HF_ENDPOINT=hub.url, HF_HOME=str(hf), HF_HUB_CACHE=str(hf / "hub"), HF_DATASETS_CACHE=str(hf / "datasets"),
                   HF_HUB_DISABLE_TELEMETRY="1", EDITLIB_CACHE=str(tmp_path / "editlib-cache"), PYTHONPATH=str(REPO))
        start = time.perf_counter()
        result = subprocess.run([sys.executable, str(tmp_path / "runner.py"), str(tmp_path / "block.py"),
                                 f"{source.name}:{MARKER}"], cwd=work, env=env, capture_output=True, text=True, timeout=1800)
        wall = time.perf_counter() - start
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    *printed, last = result.stdout.strip().splitlines()
    report = json.loads(last)
    print(f"\n{source.name} block: {report['seconds']:.0f}s (subprocess {wall:.0f}s), second_moments again "
          f"{report['cached_seconds']:.1f}s; it printed:", *printed, sep="\n")
    assert report["restored"], "editor.restore() did not give the original weights exactly"
    assert report["reloaded"], "load_edit on a fresh model did not give the edited weights exactly"
    assert report["changed"] == report["edited"], "the edit changed other weights than the edited layers'"
    assert report["same_C"]
    assert report["after"]["ES"] > report["before"]["ES"] and report["after"]["EM"] > report["before"]["EM"]
    assert (work / "edit.safetensors").is_file() and any((work / "stats").rglob("*.safetensors"))
