"""Train the toy model of a config and pin it: the model folder plus its manifest (editlib.toy.pinned).

    python -m editlib.toy.pin                      # config.yaml's world and model.train -> models/toy-5L
    python -m editlib.toy.pin --config C --out DIR
    python -m editlib.toy.pin --from .cache/models/toy-<key> --command "how it was trained"

The world is generated from the config's `data.world` exactly as the prepare_data job does, the
model trained with `model.train` exactly as the prepare_model job does (train.threads torch
threads; on 2 CPU cores the default takes about 27 minutes), and the folder is written atomically.
With --from, an already trained folder (a `model_cache` entry or a prepare_model output) is pinned
instead, after checking that it was trained with this recipe (its recall.json) and, for a
model_cache entry, on this world under these torch / transformers versions (its content key).
Commit the folder afterwards; the next run's prepare_model job copies it.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import yaml

from editlib.io import atomic_dir
from editlib.toy.pinned import MANIFEST, machine, write_manifest
from editlib.toy.recipe import TrainConfig, world_hashes


def runtime_versions() -> dict[str, str]:
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def machine_info() -> dict:
    """`editlib.toy.pinned.machine()` plus the CPU kernels torch picks on it (AVX2, AVX512, ...)."""
    import torch

    info = machine()
    try:
        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        pass
    return info


def pin(config_path: str | Path, out: str | Path | None = None, trained: str | Path | None = None,
        command: str | None = None, pinned_with: str | None = None) -> dict:
    """Write the pinned folder of `config_path`'s toy model to `out` (default: the config's
    model.pinned, else models/<model.name>) and return its manifest.

    `trained`: an already trained folder to pin instead of training (the manifest's machine is then
    this one: pin on the machine that trained it). `command`: how the model was made, as the
    manifest records it; `pinned_with`: the command that wrote the folder."""
    from editlib.toy.pretrain import model_cache_key, train_model
    from editlib.toy.world import WorldConfig, build_world

    config = yaml.safe_load(Path(config_path).read_text(encoding="utf-8"))
    model, data = config["model"], config["data"]
    if model.get("source") != "toyworld" or data.get("source") != "toyworld":
        raise SystemExit(f"{config_path}: model.source and data.source must be toyworld to pin a toy model")
    recipe = TrainConfig(**model.get("train", {}))
    world_config = asdict(WorldConfig(**data.get("world", {})))
    out = Path(out or model.get("pinned") or f"models/{model['name']}")
    if pinned_with is None:
        pinned_with = "python -m editlib.toy.pin " + shlex.join(
            ["--config", str(config_path), "--out", str(out), *(["--from", str(trained)] if trained else [])])
    if command is None:
        command = pinned_with if trained is None else f"not recorded (pinned from the trained folder {trained})"
    with tempfile.TemporaryDirectory(prefix="pin-") as tmp:
        world_dir = Path(tmp) / "world"
        build_world(world_dir, **data.get("world", {}))
        key = model_cache_key(world_dir, recipe)
        if trained is None:
            trained = Path(tmp) / "model"
            report = train_model(world_dir, trained, recipe)  # a RecallError pins nothing
        else:
            trained = Path(trained)
            report = _check_trained(trained, recipe, key)
        with atomic_dir(out) as staging:
            for path in sorted(trained.rglob("*")):
                if path.is_file() and path.name != MANIFEST:
                    (staging / path.relative_to(trained)).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, staging / path.relative_to(trained))
            manifest = write_manifest(
                staging, recipe=asdict(recipe), inputs={"world": world_hashes(world_dir), "world_config": world_config},
                versions=runtime_versions(), machine_info=machine_info(), command=command,
                pinned_with=pinned_with, model=model["name"], model_cache_key=key,
                recall={k: v for k, v in report.items() if k.startswith("recall_") or k == "train_seconds"},
            )
    return manifest


def _check_trained(folder: Path, recipe: TrainConfig, key: str) -> dict:
    import json

    report_path = folder / "recall.json"
    if not report_path.exists():
        raise SystemExit(f"{folder}: no recall.json; not a trained toy model folder")
    report = json.loads(report_path.read_text(encoding="utf-8"))
    if report.get("train_config") != asdict(recipe):
        raise SystemExit(f"{report_path}: trained with another recipe than the config's model.train")
    if not report.get("passed", False):
        raise SystemExit(f"{report_path}: the model did not pass its recall check")
    match = re.fullmatch(r"toy-([0-9a-f]{16})", folder.name)
    if match and match.group(1) != key:
        raise SystemExit(f"{folder}: a model_cache entry of another world or torch/transformers version "
                         f"(this config here gives toy-{key})")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m editlib.toy.pin", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="config.yaml", help="the config whose data.world and model.train to use")
    parser.add_argument("--out", help="the pinned folder (default: the config's model.pinned, else models/<model.name>)")
    parser.add_argument("--from", dest="trained", help="pin this trained model folder instead of training one")
    parser.add_argument("--command", help="with --from: the command that trained the model, for the manifest")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    manifest = pin(args.config, args.out, args.trained, args.command,
                   pinned_with="python -m editlib.toy.pin " + shlex.join(argv))
    out = args.out or "the config's pinned folder"
    print(f"pinned {out}: {len(manifest['files'])} files, recall_edit {manifest['recall'].get('recall_edit')}, "
          f"model_cache key {manifest['model_cache_key']}, trained on {manifest['machine']['cpu']}")


if __name__ == "__main__":
    main()
