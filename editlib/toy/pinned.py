"""Pinned trained artifacts: a folder shipped with the repository plus its manifest `pinned.json`,
used instead of training when the config's recipe and inputs match the manifest's (training rounds
floats differently on every CPU, and thousands of steps turn that into another model).

Two are pinned: the default's toy model (`models/toy-5L/`, `model.pinned`; this module's recipe
and world checks) and its trained MEND editor (`models/toy-5L-mend/`, `methods.<block>.pinned`;
editlib.study.pinned_editor). A manifest records the SHA-256 of every file of the folder, the
recipe that trained it, the SHA-256 of what training read (for the model the world files,
`MODEL_INPUTS`; for the editor the model and the records), the torch and transformers versions, the
machine that trained it and the command that made it. `python -m editlib.toy.pin` writes the model's
folder and manifest (docs/toy_model.md, "The pinned model").

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
# a pinned trained editor (editlib.study.pinned_editor): its files and the manifest's objects
EDITOR_FILES = ("editor.safetensors", "editor.json")
EDITOR_REQUIRED = ("files", "recipe", "inputs")


class PinnedModelError(ValueError):
    """A pinned folder that cannot be used: missing, without a readable manifest, or with a file
    whose bytes differ from the manifest's SHA-256; the message names the file and the fix."""


def resolve(path: str | Path) -> Path:
    """The folder `path` names: as given if absolute or present in the working directory, else
    relative to the checkout (the folder holding `editlib/`)."""
    path = Path(path)
    if path.is_absolute() or path.exists() or not (CHECKOUT / path).exists():
        return path
    return CHECKOUT / path


def read_manifest(path: str | Path, required: tuple[str, ...] = _REQUIRED,
                  listed: tuple[str, ...] = ("config.json", "recall.json"), setting: str = "model.pinned",
                  thing: str = "model") -> dict:
    """The manifest of pinned folder `path`, checked: the folder exists, pinned.json parses, has the
    `required` objects, lists the `listed` files, and every file it lists is in the folder (not their
    bytes: `verify_files` hashes them). `setting` and `thing` name the config key and what it pins
    in the errors (model.pinned, model)."""
    folder = resolve(path)
    unpin = f"remove {setting} to train the {thing}"
    if not folder.is_dir():
        raise PinnedModelError(f"{path}: no such folder (looked in the working directory {Path.cwd()} and in "
                               f"the checkout {CHECKOUT}); restore it from git, or {unpin}")
    manifest_path = folder / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PinnedModelError(f"{manifest_path}: missing; a pinned folder needs its manifest, which the "
                               f"command that pinned it writes (docs/toy_model.md, \"The pinned model\")") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PinnedModelError(f"{manifest_path}: not valid JSON ({error}); restore it from git "
                               f"(git checkout -- {manifest_path})") from None
    if not isinstance(manifest, dict):
        raise PinnedModelError(f"{manifest_path}: not a JSON object")
    for key in required:
        if not isinstance(manifest.get(key), dict) or not manifest[key]:
            raise PinnedModelError(f"{manifest_path}: '{key}' is missing or not a non-empty object")
    absent = [name for name in listed if name not in manifest["files"]]
    if absent:
        raise PinnedModelError(f"{manifest_path}: 'files' must list the pinned {thing}'s {' and '.join(listed)}; "
                               f"it lacks {', '.join(absent)}")
    for name in manifest["files"]:
        if Path(name).is_absolute() or ".." in Path(name).parts or name == MANIFEST:
            raise PinnedModelError(f"{manifest_path}: files: {name!r} is not a file name inside the folder")
        if not (folder / name).is_file():
            raise PinnedModelError(f"{folder / name}: listed in {manifest_path} but missing; restore it from git "
                                   f"(git checkout -- {folder}), or {unpin}")
    return manifest


def manifest_sha256(path: str | Path) -> str:
    """SHA-256 of the manifest of pinned folder `path` (the prepare_model job's params hold it, so a
    re-pinned model reruns the job)."""
    return sha256_file(resolve(path) / MANIFEST)


def verify_files(path: str | Path, manifest: dict, setting: str = "model.pinned", thing: str = "model") -> None:
    """Every file the manifest lists has its SHA-256; else PinnedModelError naming the file."""
    folder = resolve(path)
    unpin = f"remove {setting} from the config (or set it to null) to train the {thing} instead"
    for name, expected in manifest["files"].items():
        try:
            actual = sha256_file(folder / name)
        except FileNotFoundError:
            raise PinnedModelError(f"{folder / name}: listed in {folder / MANIFEST} but missing; restore it from "
                                   f"git (git checkout -- {folder / name}), or {unpin}") from None
        if actual != expected:
            raise PinnedModelError(
                f"{folder / name}: SHA-256 {actual} differs from {expected} in {folder / MANIFEST}: the pinned file "
                f"was changed or damaged. Restore it from git (git checkout -- {folder / name}), or {unpin}")


def recipe_of(train: dict | TrainConfig) -> dict:
    """Every TrainConfig field of a `model.train` block (defaults filled in)."""
    return asdict(train if isinstance(train, TrainConfig) else TrainConfig(**train))


def differences(manifest: dict, recipe: dict, world_dir: str | Path) -> list[str]:
    """Why a model trained with `recipe` on the world in `world_dir` would not be the pinned one:
    each recipe field and world file that differs from the manifest's (empty: they match)."""
    return (mismatches("model.train", recipe, manifest["recipe"], "the pinned recipe")
            + hash_mismatches(world_hashes(world_dir), manifest["world"],
                              absent="the world has no {}, which the pinned model was trained on",
                              differs="world file {} differs from the one the pinned model was trained on"))


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


def file_hashes(paths: dict[str, str | Path]) -> dict[str, str]:
    """{name: SHA-256} of the files `paths` names; a folder stands for every file in it (as
    name/relative path), but its pinned.json and hidden files (.snakemake_timestamp)."""
    hashes = {}
    for name, path in paths.items():
        path = Path(path)
        if path.is_dir():
            for file in sorted(path.rglob("*")):
                relative = file.relative_to(path)
                if file.is_file() and file.name != MANIFEST and not any(p.startswith(".") for p in relative.parts):
                    hashes[f"{name}/{relative.as_posix()}"] = sha256_file(file)
        else:
            hashes[name] = sha256_file(path)
    return hashes


def mismatches(what: str, ours: dict, pinned: dict, against: str = "the pinned one") -> list[str]:
    """The recipe keys whose value in `ours` differs from `pinned`'s, as
    'what.key differs from <against>: ours vs pinned'."""
    absent = "<absent>"
    return [f"{what}.{key} differs from {against}: {ours.get(key, absent)!r} vs {pinned.get(key, absent)!r}"
            for key in sorted(set(ours) | set(pinned)) if ours.get(key, absent) != pinned.get(key, absent)]


def hash_mismatches(ours: dict[str, str], pinned: dict[str, str], *, absent: str, differs: str) -> list[str]:
    """The files of either {name: SHA-256} map that training read differently: `absent` (formatted with
    the name) for one `ours` lacks, `differs` for one whose hash differs or the pin does not know."""
    return [absent.format(name) if name not in ours else differs.format(name)
            for name in sorted(set(ours) | set(pinned)) if ours.get(name) != pinned.get(name)]


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


def write_manifest(folder: str | Path, *, recipe: dict, inputs: dict, versions: dict[str, str], machine_info: dict,
                   command: str, **extra) -> dict:
    """Write `folder`/pinned.json over the files now in `folder` and return it as read back. `inputs`:
    the manifest's entries for what training read (a model's `world` and `world_config`, an editor's
    `inputs`)."""
    folder = Path(folder)
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "files": {name: sha256_file(folder / name) for name in names},
        "recipe": recipe,
        **inputs,
        **versions,
        "machine": machine_info,
        "command": command,
        **extra,
    }
    write_json(folder / MANIFEST, manifest)
    return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))  # as read back (tuples are lists)
