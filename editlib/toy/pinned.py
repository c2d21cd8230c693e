"""The pinned toy model: a trained model folder shipped with the repository (`models/toy-5L/`) and
its manifest `pinned.json`, so that a config whose recipe and world match it uses the same weights
on every machine instead of training its own (training rounds floats differently on every CPU).

The manifest records the SHA-256 of every file of the folder, the training recipe (the
`TrainConfig` fields), the SHA-256 of the world files the model was trained on (`MODEL_INPUTS`),
the torch and transformers versions and the machine that trained it, and the command that made it.
`python -m editlib.toy.pin` writes a folder and its manifest (docs/toy_model.md, "The pinned model").

Torch-free: config validation and the workflow's stage params read manifests before any job.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from dataclasses import asdict
from pathlib import Path

from editlib.io import atomic_dir, sha256_file, write_json
from editlib.toy.recipe import TrainConfig, world_hashes

MANIFEST = "pinned.json"
MANIFEST_VERSION = 1
# The checkout that holds this package: a relative `model.pinned` not found in the working directory
# is read from here, so the shipped model is found whatever directory snakemake runs in.
CHECKOUT = Path(__file__).resolve().parents[2]
_REQUIRED = ("files", "recipe", "world")


class PinnedModelError(ValueError):
    """A pinned model folder that cannot be used: missing, without a readable manifest, or with a
    file whose bytes differ from the manifest's SHA-256; the message names the file and the fix."""


def resolve(path: str | Path) -> Path:
    """The folder `path` names: as given if absolute or present in the working directory, else
    relative to the checkout (the folder holding `editlib/`)."""
    path = Path(path)
    if path.is_absolute() or path.exists() or not (CHECKOUT / path).exists():
        return path
    return CHECKOUT / path


def read_manifest(path: str | Path) -> dict:
    """The manifest of pinned folder `path`, checked: the folder exists, pinned.json parses, has
    `files`, `recipe` and `world`, and every file it lists is in the folder (not their bytes:
    `verify_files` hashes them)."""
    folder = resolve(path)
    if not folder.is_dir():
        raise PinnedModelError(f"{path}: no such folder (looked in the working directory {Path.cwd()} and in "
                               f"the checkout {CHECKOUT}); restore it from git, or remove model.pinned to train the model")
    manifest_path = folder / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PinnedModelError(f"{manifest_path}: missing; a pinned model folder needs its manifest "
                               f"(python -m editlib.toy.pin writes both)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PinnedModelError(f"{manifest_path}: not valid JSON ({error}); restore it from git "
                               f"(git checkout -- {manifest_path})") from None
    if not isinstance(manifest, dict):
        raise PinnedModelError(f"{manifest_path}: not a JSON object")
    for key in _REQUIRED:
        if not isinstance(manifest.get(key), dict) or not manifest[key]:
            raise PinnedModelError(f"{manifest_path}: '{key}' is missing or not a non-empty object")
    if "recall.json" not in manifest["files"] or "config.json" not in manifest["files"]:
        raise PinnedModelError(f"{manifest_path}: 'files' must list the model folder's config.json and recall.json")
    for name in manifest["files"]:
        if Path(name).is_absolute() or ".." in Path(name).parts or name == MANIFEST:
            raise PinnedModelError(f"{manifest_path}: files: {name!r} is not a file name inside the folder")
        if not (folder / name).is_file():
            raise PinnedModelError(f"{folder / name}: listed in {manifest_path} but missing; restore it from git "
                                   f"(git checkout -- {folder}), or remove model.pinned to train the model")
    return manifest


def manifest_sha256(path: str | Path) -> str:
    """SHA-256 of the manifest of pinned folder `path` (the prepare_model job's params hold it, so a
    re-pinned model reruns the job)."""
    return sha256_file(resolve(path) / MANIFEST)


def verify_files(path: str | Path, manifest: dict) -> None:
    """Every file the manifest lists has its SHA-256; else PinnedModelError naming the file."""
    folder = resolve(path)
    for name, expected in manifest["files"].items():
        try:
            actual = sha256_file(folder / name)
        except FileNotFoundError:
            raise PinnedModelError(f"{folder / name}: listed in {folder / MANIFEST} but missing; restore it from "
                                   f"git (git checkout -- {folder / name}), or remove model.pinned (or set it to "
                                   f"null) to train the model instead") from None
        if actual != expected:
            raise PinnedModelError(
                f"{folder / name}: SHA-256 {actual} differs from {expected} in {folder / MANIFEST}: the pinned file "
                f"was changed or damaged. Restore it from git (git checkout -- {folder / name}), or remove "
                f"model.pinned from the config (or set it to null) to train the model instead")


def recipe_of(train: dict | TrainConfig) -> dict:
    """Every TrainConfig field of a `model.train` block (defaults filled in)."""
    return asdict(train if isinstance(train, TrainConfig) else TrainConfig(**train))


def differences(manifest: dict, recipe: dict, world_dir: str | Path) -> list[str]:
    """Why a model trained with `recipe` on the world in `world_dir` would not be the pinned one:
    each recipe field and world file that differs from the manifest's (empty: they match)."""
    reasons = []
    pinned = manifest["recipe"]
    for key in sorted(set(recipe) | set(pinned)):
        ours, theirs = recipe.get(key, "<absent>"), pinned.get(key, "<absent>")
        if ours != theirs:
            reasons.append(f"model.train.{key} differs from the pinned recipe: {ours!r} vs {theirs!r}")
    world = world_hashes(world_dir)
    for name in sorted(set(world) | set(manifest["world"])):
        if name not in world:
            reasons.append(f"the world has no {name}, which the pinned model was trained on")
        elif world[name] != manifest["world"].get(name):
            reasons.append(f"world file {name} differs from the one the pinned model was trained on")
    return reasons


def version_differences(manifest: dict, versions: dict[str, str]) -> list[str]:
    """The libraries whose running version differs from the one the pinned model was trained with."""
    return [f"{name} {versions[name]} (pinned under {manifest[name]})"
            for name in sorted(versions) if name in manifest and manifest[name] != versions[name]]


def copy_pinned(path: str | Path, out_dir: str | Path, manifest: dict) -> dict:
    """Verify every pinned file's SHA-256, copy the files and the manifest into `out_dir`
    (atomically) and return the model's recall report (recall.json)."""
    folder = resolve(path)
    verify_files(folder, manifest)
    with atomic_dir(out_dir) as staging:
        for name in [*manifest["files"], MANIFEST]:
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / name, staging / name)
    return json.loads((Path(out_dir) / "recall.json").read_text(encoding="utf-8"))


def machine() -> dict:
    """The machine this runs on: CPU model (/proc/cpuinfo), core count, architecture, OS."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "arch": platform.machine(), "system": platform.system()}


def write_manifest(folder: str | Path, *, recipe: dict, world_dir: str | Path, world_config: dict,
                   versions: dict[str, str], machine_info: dict, command: str, **extra) -> dict:
    """Write `folder`/pinned.json over the files now in `folder` and return it as read back."""
    folder = Path(folder)
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "files": {name: sha256_file(folder / name) for name in names},
        "recipe": recipe,
        "world": world_hashes(world_dir),
        "world_config": world_config,
        **versions,
        "machine": machine_info,
        "command": command,
        **extra,
    }
    write_json(folder / MANIFEST, manifest)
    return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))  # as read back (tuples are lists)
