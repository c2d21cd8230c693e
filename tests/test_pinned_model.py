"""The pinned toy model (editlib.toy.pinned, models/toy-5L): the shipped files match their manifest,
the default config really uses them, prepare_model copies a pinned model when the recipe and the
world match and trains otherwise (saying which in its log), a damaged pinned file is an error
naming it, and validation and the job's params read model.pinned before any job."""

from __future__ import annotations

import copy
import json
import logging
import re
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import yaml

from editlib.io import sha256_file
from editlib.study.config import ConfigError, validate_config
from editlib.study.stages import model_config, stage_config
from editlib.toy import pinned as pins
from editlib.toy.recipe import MODEL_INPUTS, TrainConfig
from editlib.toy.world import build_world

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "models" / "toy-5L"
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
TINY_WORLD = {"seed": 0, "n_subjects": 40}
# two steps of a one-layer model: the recall check is off, only the files matter here
TINY_RECIPE = TrainConfig(layers=1, hidden=32, intermediate=64, steps=2, batch_size=8, vocab_size=512,
                          warmup_steps=1, recall_threshold=0.0)
LOGGER = "editlib.study.pipeline"


def read_config(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------- the shipped model


def test_shipped_files_match_the_manifest():
    """Every file of models/toy-5L has the SHA-256 its manifest records, and the manifest lists every
    file of the folder; a changed byte fails here (and in the prepare_model job)."""
    manifest = pins.read_manifest(SHIPPED)
    on_disk = sorted(p.name for p in SHIPPED.iterdir() if p.is_file() and p.name != pins.MANIFEST)
    assert sorted(manifest["files"]) == on_disk
    assert {"config.json", "model.safetensors", "tokenizer.json", "recall.json"} <= set(on_disk)
    for name, expected in manifest["files"].items():
        assert sha256_file(SHIPPED / name) == expected, f"{SHIPPED / name} differs from {SHIPPED / pins.MANIFEST}"
    pins.verify_files(SHIPPED, manifest)
    assert set(manifest["world"]) == set(MODEL_INPUTS)
    assert manifest["machine"]["cpu"] and manifest["machine"]["cores"] and manifest["command"]
    assert {"torch", "transformers"} <= set(manifest)
    recall = json.loads((SHIPPED / "recall.json").read_text(encoding="utf-8"))
    assert recall["train_config"] == manifest["recipe"] and recall["passed"]


@pytest.mark.parametrize("name", ["config.yaml", "configs/toy-ablations.yaml"])
def test_the_default_recipe_and_world_match_the_shipped_manifest(name, tmp_path):
    """config.yaml (and toy-ablations' main model) pin models/toy-5L and its recipe and world are
    the manifest's: the prepare_data world, generated here, has the same bytes, so the default
    copies the shipped model instead of training one."""
    config = read_config(name)
    assert config["model"]["pinned"] == "models/toy-5L"
    build_world(tmp_path, **config["data"]["world"])  # as the prepare_data job does
    manifest = pins.read_manifest(config["model"]["pinned"])
    recipe = pins.recipe_of(config["model"]["train"])
    assert pins.differences(manifest, recipe, tmp_path) == []
    assert manifest["world_config"] == {**manifest["world_config"], **config["data"]["world"]}
    # the same content key as the model_cache entry it was pinned from (under the pinned versions)
    import torch
    import transformers

    from editlib.toy.pretrain import model_cache_key

    if (torch.__version__, transformers.__version__) == (manifest["torch"], manifest["transformers"]):
        assert model_cache_key(tmp_path, TrainConfig(**config["model"]["train"])) == manifest["model_cache_key"]


def test_configs_with_another_recipe_or_world_train(tmp_path):
    """toy-ablations' other models inherit model.pinned but differ in recipe, so they train;
    toy-zsre has another world (questions in the corpus) and is not pinned."""
    ablations = read_config("configs/toy-ablations.yaml")
    manifest = pins.read_manifest(SHIPPED)
    build_world(tmp_path / "world", **ablations["data"]["world"])
    for name in ("toy-5L-narrow", "toy-5L-chat"):
        recipe = pins.recipe_of(model_config(ablations, name)["model"]["train"])
        assert any(r.startswith("model.train.") for r in pins.differences(manifest, recipe, tmp_path / "world")), name
    zsre = read_config("configs/toy-zsre.yaml")
    assert "pinned" not in zsre["model"]
    build_world(tmp_path / "zsre", **zsre["data"]["world"])
    assert "world file train_corpus.txt differs from the one the pinned model was trained on" in \
        pins.differences(manifest, pins.recipe_of(zsre["model"]["train"]), tmp_path / "zsre")


def test_prepare_model_params_hold_the_manifest_hash(tmp_path):
    """A re-pinned model (another manifest) changes the prepare_model job's params, so Snakemake
    reruns it; without model.pinned the params have no such entry."""
    config = read_config("config.yaml")
    params = stage_config(config, "prepare_model")
    assert params["model"]["pinned"] == "models/toy-5L"
    assert params["pinned_manifest_sha256"] == sha256_file(SHIPPED / pins.MANIFEST)
    other = tmp_path / "pinned"
    shutil.copytree(SHIPPED, other)
    manifest = json.loads((other / pins.MANIFEST).read_text())
    (other / pins.MANIFEST).write_text(json.dumps({**manifest, "command": "re-pinned"}))
    config["model"]["pinned"] = str(other)
    assert stage_config(config, "prepare_model")["pinned_manifest_sha256"] != params["pinned_manifest_sha256"]
    config["model"]["pinned"] = None
    assert "pinned_manifest_sha256" not in stage_config(config, "prepare_model")


def test_a_relative_pinned_path_is_found_from_another_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert pins.resolve("models/toy-5L") == SHIPPED
    assert pins.read_manifest("models/toy-5L")["model"] == "toy-5L"
    (tmp_path / "models" / "toy-5L").mkdir(parents=True)  # the working directory's own folder comes first
    assert pins.resolve("models/toy-5L") == Path("models/toy-5L")


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize("pinned, message", [
    ("no/such/folder", r"config\.yaml: model\.pinned: no/such/folder: no such folder"),
    ("EMPTY", r"config\.yaml: model\.pinned: .*pinned\.json: missing"),
    ("BROKEN", r"config\.yaml: model\.pinned: .*pinned\.json: not valid JSON"),
    ("NO_RECIPE", r"config\.yaml: model\.pinned: .*pinned\.json: 'recipe' is missing"),
    ("LOST_FILE", r"config\.yaml: model\.pinned: .*model\.safetensors: listed in .*pinned\.json but missing"),
])
def test_validation_checks_model_pinned_before_any_job(pinned, message, tmp_path):
    folder = tmp_path / pinned
    if pinned != "no/such/folder":
        shutil.copytree(SHIPPED, folder) if pinned in ("NO_RECIPE", "LOST_FILE") else folder.mkdir()
    if pinned == "BROKEN":
        (folder / pins.MANIFEST).write_text("{not json")
    if pinned == "NO_RECIPE":
        manifest = json.loads((folder / pins.MANIFEST).read_text())
        del manifest["recipe"]
        (folder / pins.MANIFEST).write_text(json.dumps(manifest))
    if pinned == "LOST_FILE":
        (folder / "model.safetensors").unlink()
    config = read_config("config.yaml")
    config["model"]["pinned"] = pinned if pinned == "no/such/folder" else str(folder)
    with pytest.raises(ConfigError, match=message):
        validate_config(config, SCHEMA, source="config.yaml")


def test_model_pinned_null_validates_and_other_sources_cannot_pin():
    config = read_config("config.yaml")
    validate_config(config, SCHEMA, source="config.yaml")
    config["model"]["pinned"] = None
    validate_config(config, SCHEMA, source="config.yaml")
    smollm2 = read_config("configs/smollm2.yaml")
    smollm2["model"]["pinned"] = "models/toy-5L"
    with pytest.raises(ConfigError, match=r"smollm2\.yaml: model\.pinned: .*needs model\.source toyworld"):
        validate_config(smollm2, SCHEMA, source="smollm2.yaml")


# ---------------------------------------------------------------------------- prepare_model on a tiny model


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    build_world(out, **TINY_WORLD)
    return out


@pytest.fixture(scope="module")
def pinned_dir(tmp_path_factory) -> Path:
    """A tiny model trained and pinned by `python -m editlib.toy.pin` from a config file."""
    from editlib.toy.pin import pin

    root = tmp_path_factory.mktemp("pin")
    config = {"model": {"source": "toyworld", "name": "tiny", "train": asdict(TINY_RECIPE)},
              "data": {"source": "toyworld", "world": TINY_WORLD}}
    (root / "tiny.yaml").write_text(yaml.safe_dump(config))
    manifest = pin(root / "tiny.yaml", root / "pinned")
    assert manifest["recipe"] == asdict(TINY_RECIPE) and manifest["command"].startswith("python -m editlib.toy.pin")
    assert json.loads((root / "pinned" / pins.MANIFEST).read_text()) == manifest
    return root / "pinned"


def stage(pinned, cache: Path | None, recipe: TrainConfig = TINY_RECIPE) -> dict:
    """prepare_model's params for the tiny model (as stage_config gives them)."""
    model = {"source": "toyworld", "name": "tiny", "dtype": "float32", "device": "cpu", "train": asdict(recipe)}
    if pinned != "absent":
        model["pinned"] = None if pinned is None else str(pinned)
    return {"seed": 0, "model": model, "model_cache": None if cache is None else str(cache)}


def no_training(monkeypatch):
    import editlib.toy.pretrain as pretrain

    monkeypatch.setattr(pretrain, "_train_and_save", lambda *args: pytest.fail("trained instead of copying"))


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.getMessage().startswith("model: ")]


def test_prepare_model_copies_the_pinned_model_when_recipe_and_world_match(pinned_dir, world_dir, tmp_path,
                                                                            monkeypatch, caplog):
    from editlib.study.pipeline import prepare_model

    caplog.set_level(logging.INFO, logger=LOGGER)
    no_training(monkeypatch)
    report = prepare_model(stage(pinned_dir, tmp_path / "cache"), tmp_path / "model", data_dir=world_dir)
    assert report == json.loads((pinned_dir / "recall.json").read_text())
    for name in (*pins.read_manifest(pinned_dir)["files"], pins.MANIFEST):
        assert (tmp_path / "model" / name).read_bytes() == (pinned_dir / name).read_bytes(), name
    assert messages(caplog) == [f"model: pinned {pinned_dir} (recipe and world match its manifest; sha256 verified; "
                                f"trained on {pins.machine()['cpu']})"]
    assert not (tmp_path / "cache").exists()  # neither trained nor cached


def test_other_versions_are_logged_and_the_pinned_weights_used(pinned_dir, world_dir, tmp_path, monkeypatch, caplog):
    from editlib.study.pipeline import prepare_model

    caplog.set_level(logging.INFO, logger=LOGGER)
    no_training(monkeypatch)
    other = tmp_path / "pinned"
    shutil.copytree(pinned_dir, other)
    manifest = json.loads((other / pins.MANIFEST).read_text())
    (other / pins.MANIFEST).write_text(json.dumps({**manifest, "torch": "1.0.0"}))
    prepare_model(stage(other, None), tmp_path / "model", data_dir=world_dir)
    [message] = messages(caplog)
    assert message.startswith(f"model: pinned {other} (recipe and world match")
    assert "running torch " in message and "(pinned under 1.0.0): the weights are used as they are" in message


def test_prepare_model_trains_when_the_recipe_or_the_world_differs(pinned_dir, world_dir, tmp_path, caplog):
    from editlib.study.pipeline import prepare_model

    caplog.set_level(logging.INFO, logger=LOGGER)
    prepare_model(stage(pinned_dir, tmp_path / "cache", replace(TINY_RECIPE, steps=3)), tmp_path / "a", data_dir=world_dir)
    assert json.loads((tmp_path / "a" / "recall.json").read_text())["train_config"]["steps"] == 3
    assert not (tmp_path / "a" / pins.MANIFEST).exists()
    [message] = messages(caplog)
    assert message.startswith(f"model: trained (model.train.steps differs from the pinned recipe: 3 vs 2 "
                              f"(pinned: {pinned_dir})); training now, 3 steps, into model_cache ")
    caplog.clear()
    changed = tmp_path / "world"
    shutil.copytree(world_dir, changed)
    with open(changed / "train_corpus.txt", "a", encoding="utf-8") as handle:
        handle.write("One more sentence.\n")
    prepare_model(stage(pinned_dir, None), tmp_path / "b", data_dir=changed)
    assert messages(caplog) == [f"model: trained (world file train_corpus.txt differs from the one the pinned model "
                                f"was trained on (pinned: {pinned_dir})); training now, 2 steps (model_cache off)"]


def test_model_pinned_null_trains_even_when_it_matches(pinned_dir, world_dir, tmp_path, monkeypatch, caplog):
    """pinned: null (configs/overlays/train-model.yaml) or no pinned key: trained (here from a
    model_cache entry seeded with the same files, so nothing trains)."""
    from editlib.study.pipeline import prepare_model
    from editlib.toy.pretrain import model_cache_key

    caplog.set_level(logging.INFO, logger=LOGGER)
    no_training(monkeypatch)
    cached = tmp_path / "cache" / f"toy-{model_cache_key(world_dir, TINY_RECIPE)}"
    shutil.copytree(pinned_dir, cached, ignore=shutil.ignore_patterns(pins.MANIFEST))
    prepare_model(stage(None, tmp_path / "cache"), tmp_path / "a", data_dir=world_dir)
    prepare_model(stage("absent", tmp_path / "cache"), tmp_path / "b", data_dir=world_dir)
    assert messages(caplog) == [
        f"model: trained (model.pinned is null: training asked for); from model_cache {cached}, trained before",
        f"model: trained (no model.pinned in the config); from model_cache {cached}, trained before",
    ]
    assert not (tmp_path / "a" / pins.MANIFEST).exists()
    overlay = yaml.safe_load((REPO / "configs" / "overlays" / "train-model.yaml").read_text())
    assert overlay == {"model": {"pinned": None}}


@pytest.mark.parametrize("damage", ["altered", "missing"])
def test_a_damaged_pinned_file_is_an_error_naming_it(damage, pinned_dir, world_dir, tmp_path, monkeypatch):
    from editlib.study.pipeline import prepare_model

    no_training(monkeypatch)
    other = tmp_path / "pinned"
    shutil.copytree(pinned_dir, other)
    weights = other / "model.safetensors"
    if damage == "altered":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 1
        weights.write_bytes(bytes(data))
        message = rf"{re.escape(str(weights))}: SHA-256 [0-9a-f]{{64}} differs from [0-9a-f]{{64}} in " \
                  rf"{re.escape(str(other / pins.MANIFEST))}"
    else:
        weights.unlink()
        message = rf"{re.escape(str(weights))}: listed in {re.escape(str(other / pins.MANIFEST))} but missing"
    with pytest.raises(pins.PinnedModelError, match=message) as error:
        prepare_model(stage(other, None), tmp_path / "model", data_dir=world_dir)
    assert "restore it from git" in str(error.value).lower() and "model.pinned" in str(error.value)
    assert not (tmp_path / "model").exists()


def test_pin_from_a_trained_folder_checks_its_recipe(pinned_dir, tmp_path):
    """`python -m editlib.toy.pin --from DIR` pins a model trained before only if it was trained with
    the config's recipe; the copy has the same files and hashes."""
    from editlib.toy.pin import main

    config = {"model": {"source": "toyworld", "name": "tiny", "train": asdict(TINY_RECIPE)},
              "data": {"source": "toyworld", "world": TINY_WORLD}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    main(["--config", str(tmp_path / "tiny.yaml"), "--out", str(tmp_path / "again"), "--from", str(pinned_dir),
          "--command", "trained elsewhere"])
    manifest = pins.read_manifest(tmp_path / "again")
    assert manifest["files"] == pins.read_manifest(pinned_dir)["files"] and manifest["command"] == "trained elsewhere"
    assert manifest["pinned_with"].startswith("python -m editlib.toy.pin --config ")
    other = copy.deepcopy(config)
    other["model"]["train"]["steps"] = 5
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    with pytest.raises(SystemExit, match="trained with another recipe"):
        main(["--config", str(tmp_path / "other.yaml"), "--out", str(tmp_path / "x"), "--from", str(pinned_dir)])
    assert not (tmp_path / "x").exists()
