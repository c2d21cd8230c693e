"""Editing jobs read the statistics C of the layers they edit only."""

from __future__ import annotations

import json

import pytest
import torch

from editlib.editing.statistics import collect_second_moments, save_moments
from editlib.model.layout import model_layout
from editlib.study import pipeline


def test_load_context_holds_only_the_requested_layers(tiny_llama, llama_tokenizer, corpus, tmp_path):
    model_dir = tmp_path / "model"
    tiny_llama.save_pretrained(model_dir)
    llama_tokenizer.save_pretrained(model_dir)
    moments = collect_second_moments(tiny_llama, llama_tokenizer, model_layout(tiny_llama), [0, 1, 2], corpus[:5],
                                     progress=False)
    path = tmp_path / "second_moments.safetensors"
    save_moments(path, moments)
    config = {"model": {"name": "tiny"}, "metrics": {}, "target_cache": None}
    ctx = pipeline.load_context(config, model_dir, path, layers=[1])
    assert sorted(ctx.second_moments) == [1]
    torch.testing.assert_close(ctx.second_moments[1], moments[1].mean)


class Loaded(Exception):
    """Raised by the stand-in load_context: the layers it was asked for."""


@pytest.mark.parametrize("stage", ["single", "batched", "sequential", "sensitivity", "layer_sweep"])
def test_editing_jobs_ask_for_their_layers_only(stage, tmp_path, monkeypatch):
    records = tmp_path / "records.json"
    records.write_text(json.dumps([{
        "case_id": 0, "requested_rewrite": {"prompt": "{} is in", "subject": "Kotor", "relation_id": "P1",
                                            "target_new": {"str": "Paris"}, "target_true": {"str": "Rome"}},
        "paraphrase_prompts": ["p"], "neighborhood_prompts": ["n"], "generation_prompts": []}]))

    def fake_load_context(config, model_dir, moments_path, records=None, layers=None):
        raise Loaded(layers)

    monkeypatch.setattr(pipeline, "load_context", fake_load_context)
    config = {"records": {"kind": "counterfact", "zsre_target": "answers"},
              "methods": {"memit": {"layers": [3, 4]}},
              "experiments": {"layer_sweep": {"layers": [1, 2, 5], "n_records": 1}, "single": {"n_records": 1},
                              "batched": {"batch_sizes": [1]}, "sequential": {"total_edits": 1},
                              "sensitivity": {"n_records": 1, "grid": {"memit": {"mom2_update_weight": [1.0]}}}}}
    args = {"single": lambda: pipeline.run_single(config, "memit", "m", "c", records, None, "o"),
            "batched": lambda: pipeline.run_batched(config, "memit", "m", "c", records, None, "o", tmp_path / "s"),
            "sequential": lambda: pipeline.run_sequential(config, "memit", 1, "m", "c", records, None, None, "o",
                                                          tmp_path / "s", tmp_path / "ck"),
            "sensitivity": lambda: pipeline.run_sensitivity(config, "memit", "m", "c", records, None, "o"),
            "layer_sweep": lambda: pipeline.run_layer_sweep(config, "memit", "m", "c", records, "o")}
    with pytest.raises(Loaded) as loaded:
        args[stage]()
    assert list(loaded.value.args[0]) == ([1, 2, 5] if stage == "layer_sweep" else [3, 4])
