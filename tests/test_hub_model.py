"""Hub models: prepare_model fetches the snapshot into the Hugging Face cache and writes only a
pointer (hub.json) into the model folder; loading reads the cache at the pinned commit. Tested
offline with a tiny model laid out in a local cache (refs/<name> + snapshots/<sha>/)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_llama

from editlib.model.loading import full_precision_matmul, set_tf32, use_tf32
from editlib.study.config import validate_config
from editlib.study.pipeline import load_configured_model, prepare_model
from editlib.study.stages import stage_config

REPO = Path(__file__).resolve().parents[1]
REPO_ID = "tiny-org/tiny-llama"
SHA_MAIN = "a" * 40
SHA_OLD = "b" * 40


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, llama_tokenizer):
    """A local HF cache with two commits of REPO_ID: main (seed 0) and tag v1 (seed 1); offline."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf-cache"
    repo = cache / "models--tiny-org--tiny-llama"
    models = {}
    for sha, seed in ((SHA_MAIN, 0), (SHA_OLD, 1)):
        model = make_llama(llama_tokenizer, layers=2, hidden=32, seed=seed)
        model.save_pretrained(repo / "snapshots" / sha)
        llama_tokenizer.save_pretrained(repo / "snapshots" / sha)
        models[sha] = model
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA_MAIN)
    (repo / "refs" / "v1").write_text(SHA_OLD)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return models


def hub_config(revision: str | None = None) -> dict:
    model = {"source": "hub", "name": "tiny", "path": REPO_ID, "dtype": "float32", "device": "cpu"}
    if revision:
        model["revision"] = revision
    return {"seed": 0, "model": model}


def same_weights(a, b) -> bool:
    state_b = b.state_dict()
    return all(torch.equal(tensor, state_b[name]) for name, tensor in a.state_dict().items())


def test_prepare_writes_only_a_pointer_and_loading_reads_the_cache(hub_cache, tmp_path):
    out = tmp_path / "model"
    prepare_model(hub_config(), out)
    assert sorted(p.name for p in out.iterdir()) == ["hub.json"]  # no copy of the weights
    pointer = json.loads((out / "hub.json").read_text())
    assert pointer["repo_id"] == REPO_ID and pointer["revision"] == "main" and pointer["commit"] == SHA_MAIN
    model, tokenizer = load_configured_model(hub_config(), out)
    assert same_weights(model, hub_cache[SHA_MAIN]) and not same_weights(model, hub_cache[SHA_OLD])
    assert tokenizer("The capital of France is")["input_ids"]


def test_a_pinned_revision_is_honoured_and_stays_pinned(hub_cache, tmp_path):
    out = tmp_path / "model"
    prepare_model(hub_config("v1"), out)
    assert json.loads((out / "hub.json").read_text())["commit"] == SHA_OLD
    model, _ = load_configured_model(hub_config(), out)
    assert same_weights(model, hub_cache[SHA_OLD])


def test_a_pointer_whose_snapshot_is_missing_names_the_file_and_the_fix(hub_cache, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "hub.json").write_text(json.dumps({"repo_id": REPO_ID, "revision": "main", "commit": "c" * 40}))
    with pytest.raises(FileNotFoundError, match=r"hub\.json.*HF_HUB_CACHE"):
        load_configured_model(hub_config(), out)


def test_loading_uses_the_configured_dtype(hub_cache, tmp_path):
    out = tmp_path / "model"
    prepare_model(hub_config(), out)
    config = hub_config()
    config["model"]["dtype"] = "bfloat16"
    model, _ = load_configured_model(config, out)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_tf32_only_for_float32_models_on_cuda():
    assert use_tf32("float32", "cuda") is True
    assert use_tf32(torch.float32, "cuda:1") is True
    assert use_tf32("float32", "cuda", enabled=False) is False  # model.tf32: false
    assert use_tf32("bfloat16", "cuda") is None and use_tf32("float16", "cuda") is None
    assert use_tf32("float32", "cpu") is None and use_tf32("float32", "mps") is None


def test_set_tf32_sets_matmul_and_convolution_precision_and_none_leaves_them():
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = matmul.fp32_precision, conv.fp32_precision
    try:
        set_tf32(True)
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
        set_tf32(None)
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
        set_tf32(False)
        assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
        set_tf32(True)
        with full_precision_matmul():  # the statistics' Gram accumulation inside a TF32 model
            assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
    finally:
        matmul.fp32_precision, conv.fp32_precision = before


def test_model_tf32_reaches_every_job_that_loads_the_model():
    config = yaml.safe_load((REPO / "configs" / "llama3-8b.yaml").read_text())
    config["model"]["tf32"] = False
    validate_config(config, REPO / "workflow" / "schemas" / "config.schema.yaml")
    for stage in ("statistics", "causal_trace", "train_mend", "downstream_base"):
        assert stage_config(config, stage)["model"]["tf32"] is False, stage
    for stage in ("layer_sweep", "single", "batched", "sequential", "downstream_sequential"):
        assert stage_config(config, stage, "memit")["model"]["tf32"] is False, stage
