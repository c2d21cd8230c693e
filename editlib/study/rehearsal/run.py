"""The rehearsal: a paper config's whole workflow on CPU, with local stand-ins for the network.

``python -m editlib.study.rehearsal configs/llama3-8b.yaml`` (``make rehearse CONFIG=...``):

1. reads the paper config and deep-merges (`editlib.methods.hparams.deep_merge`) its rehearsal override
   ``configs/rehearsal/<name>.yaml`` over it: smaller sizes, CPU and float32, and the local tasks;
2. writes the stand-ins (`editlib.study.rehearsal.standins`, `editlib.study.rehearsal.tasks`) under
   ``<root>/hub``: a repository per hub model of the config (a tiny random model of the same
   architecture and its family's tokenizer), the ``wikimedia/wikipedia`` dataset repository, the
   tasks' dataset repositories, and CounterFact / ZsRE at their URLs' paths (as many records as
   the experiments read: `records_needed`; their true objects the model's greedy predictions
   where it has one, `standins.known_to`, so that causal tracing finds facts to trace);
3. serves them on 127.0.0.1 (`editlib.study.rehearsal.hub.LocalHub`) and points the config's record
   URLs at that server (scheme and host replaced, path kept), and ``downstream.include_path`` at the
   tasks' folder;
4. runs Snakemake on the merged config (``<root>/config.yaml``) in ``<root>/work`` with the default
   profile, its jobs seeing ``HF_ENDPOINT`` = the server and an empty Hugging Face cache under
   ``<root>/cache`` (``HF_HUB_CACHE``, ``HF_DATASETS_CACHE``, ``HF_HOME``), so the model is
   downloaded and resolved from the hub cache, and the corpus and the tasks' datasets are loaded
   by `datasets`, through their real code; ``HF_ALLOW_CODE_EVAL`` is removed from the jobs'
   environment, so only the workflow's own opt-in can allow the code-executing task;
5. stops the server and writes ``<root>/hub_requests.tsv`` (every request it answered) and
   ``<root>/summary.json`` (exit status, wall time).
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import yaml

from editlib.io import write_json, write_text
from editlib.study.stages import deep_merge

REPO = Path(__file__).resolve().parents[3]
OVERRIDES = REPO / "configs" / "rehearsal"
# removed from the jobs' environment: the rehearsal must not allow what the workflow does not
CLEARED_ENV = ("HF_ALLOW_CODE_EVAL", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN",
               "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE")
RECORD_KEYS = ("counterfact", "zsre")


def override_path(config_path: str | Path) -> Path:
    return OVERRIDES / Path(config_path).name


def read_yaml(path: str | Path) -> dict:
    with open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def rehearsal_config(config_path: str | Path) -> dict:
    """The paper config with its rehearsal override merged over it (no addresses yet)."""
    path = override_path(config_path)
    if not path.is_file():
        raise FileNotFoundError(f"no rehearsal override for {config_path}: expected {path}")
    return deep_merge(read_yaml(config_path), read_yaml(path))


def hub_models(config: dict) -> list[str]:
    """The hub ids of the config's hub models (`model` and `models`)."""
    blocks = [config["model"], *config.get("models", {}).values()]
    ids = [block.get("path", config["model"].get("path")) for block in blocks
           if block.get("source", config["model"]["source"]) == "hub"]
    return list(dict.fromkeys(ids))


def hf_datasets(config: dict) -> list[str]:
    """The hub datasets that the config's corpora name (``hf:<repo>[:<config>[:<split>]]``)."""
    specs = [config.get("stats", {}).get("corpus"), config.get("data", {}).get("corpus")]
    return list(dict.fromkeys(spec[3:].split(":")[0] for spec in specs if spec and spec.startswith("hf:")))


def pinned_revisions(config: dict) -> dict[tuple[str, str], str]:
    """The commit ids that the config's hub models pin (`revision`: 40 hex digits), by repo, so that
    the stand-ins are served as those commits."""
    blocks = [config["model"], *config.get("models", {}).values()]
    pinned = {}
    for block in blocks:
        revision = block.get("revision", config["model"].get("revision"))
        if isinstance(revision, str) and re.fullmatch(r"[0-9a-f]{40}", revision):
            pinned["models", block.get("path", config["model"].get("path"))] = revision
    return pinned


def local_url(url: str, server: str) -> str:
    """`url` with its scheme and host replaced by `server`'s (the path and query kept)."""
    parts, local = urlsplit(url), urlsplit(server)
    return urlunsplit((local.scheme, local.netloc, parts.path, parts.query, ""))


def records_needed(config: dict) -> int:
    """How many records the config's experiments read: those they edit, then MEND's training and
    held-out records after them (`editlib.study.stages.mend_training_offset`)."""
    from editlib.study.stages import mend_training_offset, trained_editor_block

    block = trained_editor_block(config)
    mend = config["methods"][block] if block else None
    return mend_training_offset(config) + (mend.get("n_train", 100) + mend.get("n_eval", 20) if mend else 0)


def build_standins(config: dict, root: Path) -> Path:
    """Every stand-in the config needs, under `root`/hub (rebuilt) and `root`/tasks; returns the
    hub folder."""
    import torch

    from . import standins, tasks

    torch.set_num_threads(config["threads"])  # as the jobs do (editlib.study.jobs.stage_logging)
    hub = root / "hub"
    shutil.rmtree(hub, ignore_errors=True)
    shutil.rmtree(root / "tasks", ignore_errors=True)
    world = standins.toy_world(seed=config["seed"])
    texts = standins.tokenizer_texts(world)
    for hub_id in hub_models(config):
        standins.write_model_repo(hub_id, hub / "models" / hub_id, texts, seed=config["seed"])
    for repo in hf_datasets(config):
        if repo != standins.WIKIPEDIA_REPO:
            raise ValueError(f"no stand-in for the hub dataset {repo!r} (only {standins.WIKIPEDIA_REPO})")
        standins.write_wikipedia_repo(hub / "datasets" / repo, world)
    data = config["data"]
    writers = {"counterfact": standins.counterfact_json, "zsre": standins.zsre_json}
    for key in RECORD_KEYS:
        if str(data.get(key, "")).startswith(("http://", "https://")):
            records = writers[key](world)[:records_needed(config)]  # facts beyond these would only be optimised
            records = standins.known_to(hub / "models" / config["model"]["path"], records, key)
            write_json(hub / "files" / urlsplit(data[key]).path.lstrip("/"), records)
    tasks.write_task_datasets(hub / "datasets", world)
    tasks.write_tasks(root / "tasks")
    return hub


def with_addresses(config: dict, server: str, tasks_dir: Path) -> dict:
    """`config` reaching the stand-ins: record URLs on `server`, the local tasks' folder indexed."""
    config = copy.deepcopy(config)
    for key in RECORD_KEYS:
        value = config["data"].get(key)
        if isinstance(value, str) and value.startswith(("http://", "https://")):
            config["data"][key] = local_url(value, server)
    config["downstream"]["include_path"] = str(tasks_dir.resolve())
    return config


def job_env(server: str, cache: Path) -> dict[str, str]:
    from .hub import hub_env

    env = {key: value for key, value in os.environ.items() if key not in CLEARED_ENV}
    env.update(hub_env(server, cache))
    return env


def rehearse(config_path: str | Path, root: str | Path | None = None, cores: str = "all", keep: bool = False,
             snakemake_args: tuple[str, ...] = ()) -> int:
    """Run the rehearsal of `config_path` (see the module docstring); returns Snakemake's exit status."""
    from .hub import LocalHub

    name = Path(config_path).stem
    root = Path(root or REPO / ".rehearsal" / name).resolve()
    config = rehearsal_config(config_path)
    if not keep:
        for folder in ("work", "cache"):
            shutil.rmtree(root / folder, ignore_errors=True)
    (root / "work").mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    hub_root = build_standins(config, root)
    built = time.monotonic() - started
    with LocalHub(hub_root, commits=pinned_revisions(config)) as hub:
        merged = with_addresses(config, hub.url, root / "tasks")
        write_text(root / "config.yaml", yaml.safe_dump(merged, sort_keys=False))
        command = [str(Path(sys.executable).with_name("snakemake")), "--snakefile", str(REPO / "Snakefile"),
                   "--directory", str(root / "work"), "--configfile", str(root / "config.yaml"),
                   "--profile", str(REPO / "workflow" / "profiles" / "default"), "--cores", str(cores),
                   *snakemake_args]
        print(f"rehearsal of {config_path}: stand-ins served at {hub.url}; {' '.join(command)}", flush=True)
        returncode = subprocess.run(command, env=job_env(hub.url, root / "cache"), cwd=root / "work").returncode
        requests = list(hub.requests)
    seconds = time.monotonic() - started
    write_text(root / "hub_requests.tsv", "".join(f"{m}\t{p}\t{s}\n" for m, p, s in requests))
    write_json(root / "summary.json", {"config": str(config_path), "returncode": returncode,
                                       "seconds": round(seconds, 1), "standins_seconds": round(built, 1),
                                       "hub_requests": len(requests)})
    print(f"rehearsal of {config_path}: exit {returncode} after {seconds:.0f} s ({root})", flush=True)
    return returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m editlib.study.rehearsal", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a paper config, e.g. configs/llama3-8b.yaml (its override: configs/rehearsal/<name>)")
    parser.add_argument("--root", help="where the stand-ins, caches and results go (default .rehearsal/<name>)")
    parser.add_argument("--cores", default="all")
    parser.add_argument("--keep", action="store_true", help="keep earlier results and caches (resume) instead of starting afresh")
    parser.add_argument("snakemake_args", nargs=argparse.REMAINDER, help="after --: more Snakemake arguments")
    args = parser.parse_args(argv)
    extra = tuple(a for a in args.snakemake_args if a != "--")
    return rehearse(args.config, args.root, args.cores, args.keep, extra)
