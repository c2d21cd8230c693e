"""The pinned trained editor: a MEND hypernetwork shipped with the repository with its manifest
(`models/toy-5L-mend/`: editor.safetensors, editor.json, pinned.json), which the train_mend job
copies instead of training when what training would read matches the manifest:

- the recipe: the job's stage config (seed, model dtype and device, the method block but its
  `pinned`, the records settings, the offset of the training records) and its torch threads;
- the inputs: the SHA-256 of every file of the prepared model and of the records file.

Training MEND rounds floats differently on every CPU and 150 steps of it turn that into another
editor (17 points of ES after 64 sequential edits between two kernel paths of one machine), so the
default pins it as it pins its toy model. Anything else differs, and the job trains, logging why.

    python -m editlib.study.pinned_editor --from resources/toy/toy-5L   # after `make reproduce`

pins the editor a run trained (its `mend/` folder, checked against that run's `model/` and
`data/records.json`) into the config's `methods.<block>.pinned` folder.

Torch-free (the command imports torch for the versions it records).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shlex
import shutil
import sys
from pathlib import Path

import yaml

from editlib.io import atomic_dir, atomic_path
from editlib.study.stages import model_config, stage_config, trained_editor_block
from editlib.toy.pinned import (
    EDITOR_FILES,
    EDITOR_REQUIRED,
    MANIFEST,
    file_hashes,
    hash_mismatches,
    mismatches,
    read_manifest,
    resolve,
    verify_files,
    write_manifest,
)

log = logging.getLogger(__name__)


def pinned_setting(config: dict) -> tuple[str | None, str | None]:
    """(the config key that pins the trained editor, the folder it names), or Nones."""
    block = trained_editor_block(config)
    if block is None:
        return None, None
    return f"methods.{block}.pinned", config["methods"][block].get("pinned")


def editor_recipe(stage: dict, threads: int) -> dict:
    """What training reads besides its inputs: the train_mend stage without the pin, plus the torch
    threads (they change how reductions round); as JSON gives it back."""
    recipe = copy.deepcopy(stage)
    recipe.pop("pinned_manifest_sha256", None)
    for block in recipe.get("methods", {}).values():
        block.pop("pinned", None)
    return json.loads(json.dumps({**recipe, "torch_threads": int(threads)}))


def editor_inputs(model_dir: str | Path, records_path: str | Path) -> dict[str, str]:
    """The SHA-256 of every file of the prepared model (model/<file>) and of the records file."""
    return file_hashes({"model": model_dir, "records.json": records_path})


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differences(manifest: dict, recipe: dict, inputs: dict) -> list[str]:
    """Why an editor trained with `recipe` on `inputs` would not be the pinned one (empty: it would)."""
    return (mismatches("recipe", _flat(recipe), _flat(manifest["recipe"]))
            + hash_mismatches(inputs, manifest["inputs"],
                              absent="input {}, which the pinned editor was trained on, is absent",
                              differs="input {} differs from the one the pinned editor was trained on"))


def use_pinned(stage: dict, recipe: dict, inputs: dict, out_path: str | Path) -> bool:
    """Copy the pinned editor to `out_path` (and its editor.json and pinned.json beside it) when the
    stage pins one and `recipe` and `inputs` match its manifest; log which it did and why."""
    setting, folder = pinned_setting(stage)
    if not folder:
        block = next(iter(stage["methods"].values()))
        log.info("mend editor: trained (%s)", f"{setting} is null" if "pinned" in block else "no pinned editor")
        return False
    manifest = read_manifest(folder, EDITOR_REQUIRED, EDITOR_FILES, setting, "editor")
    reasons = differences(manifest, recipe, inputs)
    if reasons:
        log.info("mend editor: trained (%s (pinned: %s))", "; ".join(reasons), folder)
        return False
    source = resolve(folder)
    verify_files(source, manifest, setting, "editor")
    out_path = Path(out_path)
    for name, target in (("editor.json", out_path.with_suffix(".json")), (MANIFEST, out_path.parent / MANIFEST),
                         ("editor.safetensors", out_path)):  # the declared output last
        with atomic_path(target) as staging:
            shutil.copyfile(source / name, staging)
    log.info("mend editor: pinned %s (recipe and inputs match its manifest; sha256 verified; trained on %s)",
             folder, manifest.get("machine", {}).get("cpu", "an unrecorded machine"))
    return True


def pin(config: dict, run_dir: str | Path, out: str | Path, command: str, pinned_with: str) -> dict:
    """Write `out` (editor files + manifest) from the editor a run trained: `run_dir` holds that run's
    model/, data/records.json and mend/ (resources/<run>/<model>). The editor must have been trained
    with the config's recipe (its editor.json says so when it records one)."""
    run_dir = Path(run_dir)
    trained = run_dir / "mend"
    for path in (trained / "editor.safetensors", trained / "editor.json", run_dir / "model",
                 run_dir / "data" / "records.json"):
        if not path.exists():
            raise SystemExit(f"{path}: missing; --from names a run's resources/<run>/<model> folder after its "
                             "train_mend job (model/, data/records.json, mend/editor.safetensors)")
    recipe = editor_recipe(stage_config(config, "train_mend"), config["threads"])
    trained_recipe = json.loads((trained / "editor.json").read_text(encoding="utf-8")).get("recipe")
    if trained_recipe is not None and _flat(trained_recipe) != _flat(recipe):
        raise SystemExit(f"{trained / 'editor.json'}: trained with another recipe than the config's: "
                         + "; ".join(mismatches("recipe", _flat(trained_recipe), _flat(recipe))))
    from editlib.toy.pin import machine_info, runtime_versions

    with atomic_dir(out) as staging:
        for name in EDITOR_FILES:
            shutil.copyfile(trained / name, staging / name)
        manifest = write_manifest(
            staging, recipe=recipe,
            inputs={"inputs": editor_inputs(run_dir / "model", run_dir / "data" / "records.json")},
            versions=runtime_versions(), machine_info=machine_info(), command=command, pinned_with=pinned_with)
    return manifest


def main(argv: list[str] | None = None) -> None:
    from editlib.study.config import validate_config

    parser = argparse.ArgumentParser(prog="python -m editlib.study.pinned_editor",
                                     description="Pin the MEND editor a run trained, for its config.")
    parser.add_argument("--config", default="config.yaml")
    parser.add_argument("--from", dest="run_dir", required=True,
                        help="the run's resources/<run>/<model> folder (model/, data/records.json, mend/)")
    parser.add_argument("--model", help="the model whose editor to pin (default: the config's model.name)")
    parser.add_argument("--out", help="the pinned folder (default: the config's methods.<block>.pinned)")
    parser.add_argument("--command", default="make reproduce (the train_mend job)",
                        help="the command that trained the editor, for the manifest")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    schema = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"
    raw = yaml.safe_load(Path(args.config).read_text(encoding="utf-8"))
    folders = {name: block.pop("pinned", None) for name, block in raw.get("methods", {}).items()}
    config = validate_config(raw, schema, args.config)  # the folder to write need not exist yet
    config = model_config(config, args.model or config["model"]["name"])
    block = trained_editor_block(config)
    folder = args.out or (folders.get(block) if block else None)
    if not folder:
        raise SystemExit(f"{args.config}: no trained-editor method block with a pinned folder; pass --out")
    pinned_with = "python -m editlib.study.pinned_editor " + shlex.join(argv)
    manifest = pin(config, args.run_dir, folder, args.command, pinned_with)
    print(f"pinned {folder}: {len(manifest['files'])} files, {len(manifest['inputs'])} inputs, "
          f"trained on {manifest['machine']['cpu']}")


if __name__ == "__main__":
    main()
