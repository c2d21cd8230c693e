"""Atomic file output, content-derived cache keys, and safetensors reads whose errors name the
file and how to rebuild it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors import SafetensorError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    A crash (or kill) inside the block leaves no partial `path` behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp creates 0600; give the usual file mode
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temp folder beside `path`; it replaces `path` only if the block succeeds
    (an existing `path` stays in place until then)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_tensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Atomically write tensors (to CPU, contiguous) and string metadata as one safetensors file."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, str(tmp), metadata=metadata)


class ArtifactError(ValueError, SafetensorError):
    """A file the workflow wrote cannot be read (truncated or corrupt); the message names it and
    how to rebuild it. Also a SafetensorError, so code that treats an unreadable safetensors
    cache file as a miss keeps doing so."""


def unreadable(path: str | Path, err: Exception, rule: str | None = None) -> ArtifactError:
    """The ArtifactError for safetensors file `path` that failed to read with `err`: names the
    file and how to rebuild it (`rule`: the Snakemake rule that writes it, where known)."""
    rerun = (f"delete it (rm {path}) and rerun the same snakemake command, or rerun with --forcerun {rule}"
             if rule else f"delete it (rm {path}) and rerun the same snakemake command (Snakemake rebuilds a "
             "missing output; a cache file is recomputed)")
    return ArtifactError(f"{path}: unreadable safetensors file, truncated or corrupt (a job killed while "
                         f"copying it, a full disk or a damaged transfer?): {err}. To rebuild it, {rerun}.")


def load_tensors(path: str | Path, device: str = "cpu", names=None, rule: str | None = None) -> tuple[dict, dict[str, str]]:
    """(tensors, metadata) of a safetensors file: all its tensors, or only those in `names`
    (the others are not read). A truncated or corrupt file raises ArtifactError naming it and how
    to rebuild it (`rule`: the rule that writes it, for the message); a missing one FileNotFoundError."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            wanted = handle.keys() if names is None else [name for name in handle.keys() if name in set(names)]
            return {name: handle.get_tensor(name) for name in wanted}, handle.metadata() or {}
    except SafetensorError as err:
        raise unreadable(path, err, rule) from err


def read_metadata(path: str | Path, rule: str | None = None) -> dict[str, str]:
    """The string metadata of a safetensors file, without reading its tensors (errors: as load_tensors)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except SafetensorError as err:
        raise unreadable(path, err, rule) from err


def write_text(path: str | Path, text: str) -> None:
    """Atomically write UTF-8 text."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write JSON (indented, keys in insertion order)."""
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Atomically write JSON lines."""
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_csv(path: str | Path, frame) -> None:
    """Atomically write a pandas DataFrame as CSV (no index)."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def content_key(obj: Any, length: int = 16) -> str:
    """A short hex digest of a JSON-serialisable description (sorted keys)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
