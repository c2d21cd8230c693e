"""BIG-bench 1.0.0 task files (pinned by SHA-256) and the multiple-choice rows and lm-eval task files
built from them."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from editlib.data.fetch import (
    AssetError,
    AssetUnavailable,
    ChecksumError,
    PackageArchive,
    TaskFileMirror,
    asset_manifest,
    fetch_archive,
    is_fresh,
    manifest_path,
    read_json_members,
    verify_sha256,
)
from editlib.io import atomic_path, write_json, write_jsonl

BIGBENCH_SDIST = PackageArchive(
    "bigbench", "1.0.0", "bigbench-1.0.0.tar.gz",
    "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2", binary=False,
)
BIGBENCH_TASK_ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks"


# The task files editlib reads, pinned to the bytes of the same members of bigbench-1.0.0.tar.gz.
BIGBENCH_TASK_SHA256: dict[str, str] = {
    "qa_wikidata": "6340744cf2fb958564b70a071fd01624327c067f4335939e1db2fa3a353cc802",
    "logical_deduction/three_objects": "5e3f4a7569cb70bb1469374d3d34fb7883445a9d5743e1a81fd8dcdaf6fcb40f",
    "date_understanding": "ff716f0e399109146db3a998281c39954907b78268a9b633a95582d63847822f",
    "sports_understanding": "925617612d19ca02d7b13bfb263300cc13701dca8851151a77be8ce986feadab",
    "causal_judgment": "72dea28a03226a15a6081c7bef3599569887258a90e7db923e98a8232d5d7c29",
    "navigate": "e076d286bb54c9304de99c24a8d3ddd749be78c12af5d58315195b194c8efa18",
}
BIGBENCH_GITHUB = TaskFileMirror(
    "https://raw.githubusercontent.com/google/BIG-bench/main/bigbench/benchmark_tasks/{task}/task.json",
    BIGBENCH_TASK_SHA256,
)


def bigbench_task_member(task: str) -> str:
    """Path of a BIG-bench task's JSON file inside the sdist ("logical_deduction/three_objects" ok)."""
    return f"{BIGBENCH_TASK_ROOT}/{task.strip('/')}/task.json"


def fetch_task_file(task: str, cache_dir: str | Path, mirror: TaskFileMirror = BIGBENCH_GITHUB) -> Path:
    """Path of BIG-bench `task`'s task.json in `cache_dir`, downloaded from `mirror` if absent.

    Its SHA-256 is always checked against the pinned one; a download is published only once it
    matches. Raises AssetUnavailable when the task has no pinned checksum or the URL cannot be read.
    """
    import urllib.error
    import urllib.request

    task = task.strip("/")
    expected = mirror.sha256.get(task)
    if expected is None:
        raise AssetUnavailable(
            f"BIG-bench task {task!r} has no pinned SHA-256 for single-file download (pinned: "
            f"{sorted(mirror.sha256)}); it can only come from the sdist"
        )
    target = mirror.cache_path(cache_dir, task)
    if target.exists():
        return verify_sha256(target, expected)
    url = mirror.url.format(task=task)
    try:
        with urllib.request.urlopen(url, timeout=120) as response:  # noqa: S310 (pinned URL, checked below)
            data = response.read()  # a few MB at most
    except (urllib.error.URLError, OSError) as error:
        raise AssetUnavailable(f"could not download {url}: {error}") from error
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ChecksumError(f"{url}: SHA-256 is {actual}, expected {expected} (the file differs from BIG-bench 1.0.0's); nothing was saved")
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return target


def read_bigbench_tasks(
    cache_dir: str | Path,
    tasks: Sequence[str],
    *,
    archive: PackageArchive = BIGBENCH_SDIST,
    mirror: TaskFileMirror | None = BIGBENCH_GITHUB,
) -> dict[str, Any]:
    """Parsed task.json of each BIG-bench task in `tasks` ({task: JSON}).

    From the sdist when it is cached or the index offers it; otherwise, file by file from `mirror`
    (`fetch_task_file`). Files already fetched from the mirror are used without asking the index.
    Raises AssetUnavailable, carrying both sources' reasons, when neither has the files.
    """
    cache_dir = Path(cache_dir)
    mirrored = mirror is not None and all(mirror.cache_path(cache_dir, task).exists() for task in tasks)
    if mirrored and not (cache_dir / archive.filename).exists():
        return _tasks_from_mirror(tasks, cache_dir, mirror)
    try:
        sdist = fetch_archive(archive, cache_dir)
    except AssetUnavailable as unavailable:
        if mirror is None:
            raise
        return _tasks_from_mirror(tasks, cache_dir, mirror, index_error=unavailable)
    members = read_json_members(sdist, [bigbench_task_member(task) for task in tasks])
    return {task: members[bigbench_task_member(task)] for task in tasks}


def _tasks_from_mirror(tasks: Sequence[str], cache_dir: Path, mirror: TaskFileMirror, index_error: AssetUnavailable | None = None) -> dict[str, Any]:
    try:
        paths = {task: fetch_task_file(task, cache_dir, mirror) for task in tasks}
    except AssetUnavailable as error:
        if index_error is None:
            raise
        raise AssetUnavailable(
            f"{index_error}\n\nThe single task files could not be had either: {error}\n"
            f"Either source will do; or copy each task's task.json from a BIG-bench checkout to "
            f"{mirror.cache_path(cache_dir, '<task>')} (checked against the pinned SHA-256)"
        ) from error
    return {task: json.loads(path.read_text(encoding="utf-8")) for task, path in paths.items()}


# ---------------------------------------------------------------------------- BIG-bench multiple choice

# The JSON tasks behind BIG-Bench Hard that are plain multiple choice in BIG-bench 1.0.0.
DEFAULT_BIGBENCH_MC_TASKS: tuple[str, ...] = (
    "logical_deduction/three_objects",
    "date_understanding",
    "sports_understanding",
    "causal_judgment",
    "navigate",
)
_BIGBENCH_DEFAULT_INPUT_PREFIX = "\nQ: "  # BIG-bench's default example_input_prefix


def bigbench_mc_rows(task: Mapping[str, Any], limit: int | None = None, seed: int = 0, name: str = "task") -> list[dict]:
    """Multiple-choice rows {"question", "choices", "answer"} from a BIG-bench JSON task.

    question = task_prefix + example_input_prefix (BIG-bench default "\\nQ: ") + input, stripped and
    with runs of blank lines collapsed to one;
    choices are the ``target_scores`` keys in file order; answer is the index of the single
    highest score (examples without a unique best choice are skipped). With `limit`, a seeded
    sample of that many examples is kept, in file order.
    """
    examples = task.get("examples")
    if not isinstance(examples, list) or not examples:
        raise AssetError(f"BIG-bench task {name!r} has no 'examples' (a parent of subtasks? name a subtask, e.g. '{name}/three_objects')")
    prefix = task.get("task_prefix", "") + task.get("example_input_prefix", _BIGBENCH_DEFAULT_INPUT_PREFIX)
    rows = []
    for example in examples:
        scores = example.get("target_scores")
        if not isinstance(scores, dict) or len(scores) < 2:
            continue
        choices = [str(choice).strip() for choice in scores]
        values = list(scores.values())
        best = max(values)
        if values.count(best) != 1 or not all(choices):
            continue
        question = re.sub(r"\n{3,}", "\n\n", prefix + str(example["input"])).strip()
        rows.append({"question": question, "choices": choices, "answer": values.index(best)})
    if not rows:
        raise AssetError(f"BIG-bench task {name!r}: no multiple-choice examples (no 'target_scores' with a unique best)")
    if limit is not None and limit < len(rows):
        keep = sorted(random.Random(f"{seed}|{name}").sample(range(len(rows)), limit))
        rows = [rows[i] for i in keep]
    return rows


def bigbench_mc_filename(task: str) -> str:
    """Output file name for a task: "logical_deduction/three_objects" -> "logical_deduction_three_objects.jsonl"."""
    return task.strip("/").replace("/", "_") + ".jsonl"


def prepare_bigbench_mc(
    cache_dir: str | Path,
    out_dir: str | Path,
    tasks: Sequence[str] = DEFAULT_BIGBENCH_MC_TASKS,
    *,
    limit: int | None = 250,
    seed: int = 0,
    archive: PackageArchive = BIGBENCH_SDIST,
    mirror: TaskFileMirror | None = BIGBENCH_GITHUB,
) -> dict[str, Path]:
    """Write one multiple-choice jsonl per BIG-bench task to `out_dir` (see `bigbench_mc_rows`).

    Returns {task: path}; file names come from `bigbench_mc_filename`. Only tasks whose output is
    missing or stale are converted, in one pass over the sdist (or from `mirror`, see
    `read_bigbench_tasks`).
    """
    out_dir = Path(out_dir)
    manifests = {task: asset_manifest("bigbench_mc", archive, {"member": bigbench_task_member(task), "limit": limit, "seed": seed, "converter": 1}) for task in tasks}
    paths = {task: out_dir / bigbench_mc_filename(task) for task in tasks}
    stale = [task for task in tasks if not is_fresh(paths[task], manifest_path(paths[task]), manifests[task])]
    if stale:
        task_files = read_bigbench_tasks(cache_dir, stale, archive=archive, mirror=mirror)
        for task in stale:
            rows = bigbench_mc_rows(task_files[task], limit=limit, seed=seed, name=task)
            write_jsonl(paths[task], rows)
            write_json(manifest_path(paths[task]), {**manifests[task], "n_rows": len(rows)})
    return paths
