"""The pinned MEND editor (editlib.study.pinned_editor, models/toy-5L-mend): the shipped files match
their manifest, which was trained with exactly the default's train_mend recipe on the pinned model
and the default world's records; the job copies it when recipe and inputs match and trains
otherwise, saying which; a damaged file is an error naming it; validation and params read it."""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml

from editlib.io import sha256_file
from editlib.study import pinned_editor
from editlib.study.config import ConfigError, validate_config
from editlib.study.stages import stage_config
from editlib.toy import pinned as pins
from editlib.toy.world import build_world

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "models" / "toy-5L-mend"
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
LOGGER = "editlib.study.pinned_editor"


def default_config() -> dict:
    return validate_config(yaml.safe_load((REPO / "config.yaml").read_text(encoding="utf-8")), SCHEMA, "config.yaml")


def default_recipe(config: dict) -> dict:
    return pinned_editor.editor_recipe(stage_config(config, "train_mend"), config["threads"])


def test_the_shipped_editor_matches_its_manifest():
    manifest = pins.read_manifest(SHIPPED, pins.EDITOR_REQUIRED, pins.EDITOR_FILES)
    assert sorted(manifest["files"]) == sorted(p.name for p in SHIPPED.iterdir() if p.name != pins.MANIFEST)
    for name, expected in manifest["files"].items():
        assert sha256_file(SHIPPED / name) == expected
    assert manifest["machine"]["cpu"] and manifest["command"] and {"torch", "transformers"} <= set(manifest)


def test_the_default_pins_it_with_its_own_recipe_model_and_records(tmp_path):
    """config.yaml's train_mend job reads exactly the manifest's recipe; the manifest's model inputs are
    the pinned toy model's files and its records are the default world's CounterFact records (built
    here as prepare_data builds them), so the default copies the shipped editor."""
    config = default_config()
    assert config["methods"]["mend"]["pinned"] == "models/toy-5L-mend"
    manifest = pins.read_manifest(SHIPPED, pins.EDITOR_REQUIRED, pins.EDITOR_FILES)
    assert pinned_editor.differences(manifest, default_recipe(config), manifest["inputs"]) == []
    model = pins.read_manifest(REPO / "models" / "toy-5L")
    assert {f"model/{name}": digest for name, digest in model["files"].items()} == {
        name: digest for name, digest in manifest["inputs"].items() if name.startswith("model/")}
    build_world(tmp_path, **config["data"]["world"])
    assert sha256_file(tmp_path / "counterfact.json") == manifest["inputs"]["records.json"]


def _pinned_copy(tmp_path: Path) -> tuple[dict, Path]:
    """The default's train_mend stage pinning a copy of the shipped folder."""
    folder = tmp_path / "pinned"
    shutil.copytree(SHIPPED, folder)
    stage = copy.deepcopy(stage_config(default_config(), "train_mend"))
    stage["methods"]["mend"]["pinned"] = str(folder)
    return stage, folder


def test_matching_recipe_and_inputs_copy_the_pinned_editor(tmp_path, caplog):
    stage, folder = _pinned_copy(tmp_path)
    manifest = json.loads((folder / pins.MANIFEST).read_text())
    out = tmp_path / "run" / "mend" / "editor.safetensors"
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert pinned_editor.use_pinned(stage, default_recipe(default_config()), manifest["inputs"], out)
    assert sha256_file(out) == manifest["files"]["editor.safetensors"]
    assert sha256_file(out.with_suffix(".json")) == manifest["files"]["editor.json"]
    assert (out.parent / pins.MANIFEST).exists()
    assert f"mend editor: pinned {folder}" in caplog.text


@pytest.mark.parametrize("change", ["hparams", "threads", "model", "records"])
def test_another_recipe_or_input_trains_and_says_why(tmp_path, caplog, change):
    stage, folder = _pinned_copy(tmp_path)
    inputs = dict(json.loads((folder / pins.MANIFEST).read_text())["inputs"])
    threads = default_config()["threads"]
    if change == "hparams":
        stage["methods"]["mend"]["hparams"]["steps"] = 10
    if change == "threads":
        threads += 1
    if change == "model":
        inputs["model/model.safetensors"] = "0" * 64
    if change == "records":
        inputs["records.json"] = "0" * 64
    recipe = pinned_editor.editor_recipe(stage, threads)
    out = tmp_path / "run" / "mend" / "editor.safetensors"
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert not pinned_editor.use_pinned(stage, recipe, inputs, out)
    assert not out.exists()
    expected = {"hparams": "recipe.methods.mend.hparams.steps differs from the pinned one: 10 vs 150",
                "threads": f"recipe.torch_threads differs from the pinned one: {threads} vs {threads - 1}",
                "model": "input model/model.safetensors differs", "records": "input records.json differs"}[change]
    assert "mend editor: trained (" in caplog.text and expected in caplog.text


def test_a_damaged_pinned_file_is_an_error_naming_it(tmp_path):
    stage, folder = _pinned_copy(tmp_path)
    manifest = json.loads((folder / pins.MANIFEST).read_text())
    with open(folder / "editor.safetensors", "r+b") as handle:
        handle.seek(-1, 2)
        handle.write(b"\x00" if handle.read(1) != b"\x00" else b"\x01")
    with pytest.raises(pins.PinnedModelError, match=r"editor\.safetensors: SHA-256 .* methods\.mend\.pinned"):
        pinned_editor.use_pinned(stage, default_recipe(default_config()), manifest["inputs"],
                                 tmp_path / "run" / "mend" / "editor.safetensors")


def test_validation_checks_the_pinned_editor_before_any_job(tmp_path):
    raw = yaml.safe_load((REPO / "config.yaml").read_text(encoding="utf-8"))
    missing = copy.deepcopy(raw)
    missing["methods"]["mend"]["pinned"] = str(tmp_path / "absent")
    with pytest.raises(ConfigError, match=r"methods\.mend\.pinned: .*absent: no such folder"):
        validate_config(missing, SCHEMA, "config.yaml")
    wrong_method = copy.deepcopy(raw)
    wrong_method["methods"]["rome"]["pinned"] = "models/toy-5L-mend"
    with pytest.raises(ConfigError, match=r"methods\.rome\.pinned: only a method with a trained editor"):
        validate_config(wrong_method, SCHEMA, "config.yaml")
    no_manifest = copy.deepcopy(raw)
    (tmp_path / "empty").mkdir()
    no_manifest["methods"]["mend"]["pinned"] = str(tmp_path / "empty")
    with pytest.raises(ConfigError, match=r"pinned\.json: missing"):
        validate_config(no_manifest, SCHEMA, "config.yaml")


def test_a_repinned_editor_reruns_the_job_and_nothing_else(tmp_path):
    """The train_mend params hold the manifest's SHA-256; the editing stages' params do not change."""
    config = default_config()
    before = stage_config(config, "train_mend")
    assert before["pinned_manifest_sha256"] == sha256_file(SHIPPED / pins.MANIFEST)
    _, folder = _pinned_copy(tmp_path)
    manifest = json.loads((folder / pins.MANIFEST).read_text())
    manifest["command"] = "trained elsewhere"
    (folder / pins.MANIFEST).write_text(json.dumps(manifest))
    repinned = copy.deepcopy(config)
    repinned["methods"]["mend"]["pinned"] = str(folder)
    assert stage_config(repinned, "train_mend")["pinned_manifest_sha256"] != before["pinned_manifest_sha256"]
    assert stage_config(repinned, "single", "rome") == stage_config(config, "single", "rome")


def test_only_the_train_mend_job_reads_the_pin():
    config = default_config()
    unpinned = copy.deepcopy(config)
    del unpinned["methods"]["mend"]["pinned"]
    for stage in ("single", "sequential", "downstream_sequential"):
        assert stage_config(config, stage, "mend") == stage_config(unpinned, stage, "mend")
    assert "pinned" in stage_config(config, "train_mend")["methods"]["mend"]


def test_the_train_mend_job_copies_the_pinned_editor_for_the_default(tmp_path, caplog):
    """pipeline.train_mend_editor with the default's stage, the pinned model as prepare_model copies it
    and the default world's records, under the config's one torch thread: no training, the shipped
    bytes."""
    import torch

    from editlib.study.pipeline import train_mend_editor

    config = default_config()
    build_world(tmp_path / "data", **config["data"]["world"])
    model_dir = tmp_path / "model"
    pins.copy_pinned(REPO / "models" / "toy-5L", model_dir, pins.read_manifest(REPO / "models" / "toy-5L"))
    (model_dir / ".snakemake_timestamp").touch()
    out = tmp_path / "mend" / "editor.safetensors"
    threads = torch.get_num_threads()
    torch.set_num_threads(config["threads"])
    try:
        with caplog.at_level(logging.INFO, logger=LOGGER):
            held_out = train_mend_editor(stage_config(config, "train_mend"), model_dir,
                                         tmp_path / "data" / "counterfact.json", out)
    finally:
        torch.set_num_threads(threads)
    assert "mend editor: pinned models/toy-5L-mend" in caplog.text, caplog.text
    assert sha256_file(out) == sha256_file(SHIPPED / "editor.safetensors")
    assert held_out == json.loads((SHIPPED / "editor.json").read_text())["held_out"]
