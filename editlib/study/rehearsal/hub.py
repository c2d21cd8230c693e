"""A local stand-in for the Hugging Face Hub and for plain file hosts, on 127.0.0.1 (stdlib only).

`LocalHub(root)` serves the folders under `root`:

- ``root/models/<owner>/<name>/`` and ``root/datasets/<owner>/<name>/``: repositories, each one
  commit on branch ``main`` (its id a SHA-1 of the files' paths and contents, or the id given in
  `commits`, so that a config's pinned revision resolves), through the
  endpoints that `huggingface_hub` (snapshot_download, hf_hub_download, HfFileSystem) and
  `datasets` (load_dataset, streaming or not) call: repo info (``/api/<type>s/<repo>[/revision/<rev>]``),
  tree listings (``/api/<type>s/<repo>/tree/<rev>[/<path>]``), paths-info, and file downloads
  (``[/datasets]/<repo>/resolve/<rev>/<path>``, HEAD and GET, with byte ranges). Any other
  revision (e.g. ``refs/convert/parquet``) answers 404 RevisionNotFound, an unknown file 404
  EntryNotFound, as the Hub does;
- ``root/files/<path>``: plain files at ``/<path>`` (a URL's path kept, its host replaced).

Point ``HF_ENDPOINT`` at `LocalHub.url` so that both libraries talk to it. Every request is
appended to `requests` (method, path, status), for tests and for finding out what a library asks.
The server runs in daemon threads; `stop()` (or leaving the ``with`` block) shuts it down.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

REPO_TYPES = ("models", "datasets")
_API = re.compile(r"^/api/(models|datasets)/([^/]+/[^/]+)(?:/(revision|tree|paths-info)(?:/(.*))?)?$")
_RESOLVE = re.compile(r"^/(?:(datasets)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_CREATED = "2024-01-01T00:00:00.000Z"


@dataclass
class _Repo:
    kind: str  # "models" or "datasets"
    repo_id: str
    folder: Path
    files: dict[str, Path] = field(default_factory=dict)  # path in repo -> file
    sha: str = ""

    @classmethod
    def scan(cls, kind: str, repo_id: str, folder: Path, commit: str | None = None) -> _Repo:
        files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
        digest = hashlib.sha1()
        for path, file in files.items():
            digest.update(path.encode() + b"\0" + hashlib.sha1(file.read_bytes()).digest())
        return cls(kind, repo_id, folder, files, commit or digest.hexdigest())

    def oid(self, path: str) -> str:
        """A file's git blob id (as the Hub reports it)."""
        data = self.files[path].read_bytes()
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def file_entry(self, path: str) -> dict:
        size = self.files[path].stat().st_size
        return {"type": "file", "oid": self.oid(path), "size": size, "path": path}

    def directories(self) -> set[str]:
        return {"/".join(path.split("/")[:i]) for path in self.files for i in range(1, path.count("/") + 1)}

    def tree(self, prefix: str, recursive: bool) -> list[dict] | None:
        """The entries under folder `prefix` ("" the root), or None when there is no such folder."""
        prefix = prefix.strip("/")
        dirs = self.directories()
        if prefix and prefix not in dirs:
            return None
        start = f"{prefix}/" if prefix else ""
        entries = []
        for directory in sorted(dirs):
            rest = directory[len(start):] if directory.startswith(start) else None
            if rest and (recursive or "/" not in rest):
                entries.append({"type": "directory", "oid": hashlib.sha1(directory.encode()).hexdigest(), "size": 0,
                                "path": directory})
        for path in self.files:
            rest = path[len(start):] if path.startswith(start) else None
            if rest and (recursive or "/" not in rest):
                entries.append(self.file_entry(path))
        return entries

    def info(self) -> dict:
        card = _card_data(self.files.get("README.md"))
        info = {
            "_id": hashlib.sha1(self.repo_id.encode()).hexdigest()[:24], "id": self.repo_id,
            "author": self.repo_id.split("/")[0], "sha": self.sha, "lastModified": _CREATED, "createdAt": _CREATED,
            "private": False, "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [],
            "siblings": [{"rfilename": path} for path in self.files], "cardData": card,
        }
        if self.kind == "models":
            info.update({"modelId": self.repo_id, "library_name": "transformers", "pipeline_tag": "text-generation"})
            if "config.json" in self.files:
                config = json.loads(self.files["config.json"].read_text(encoding="utf-8"))
                info["config"] = {"architectures": config.get("architectures"), "model_type": config.get("model_type")}
        return info


def _card_data(readme: Path | None) -> dict:
    """The YAML header of a README.md (the Hub's cardData), parsed when PyYAML is there."""
    if readme is None:
        return {}
    text = readme.read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        return {}
    try:
        import yaml
    except ImportError:  # pragma: no cover - PyYAML is a dependency of editlib
        return {}
    return yaml.safe_load(text[4:text.index("\n---", 4)]) or {}


class LocalHub:
    """The threaded HTTP server over `root` (see the module docstring); a context manager."""

    def __init__(self, root: str | Path, host: str = "127.0.0.1", port: int = 0,
                 commits: dict[tuple[str, str], str] | None = None):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"LocalHub serves the loopback interface only, not {host!r}")
        self.root = Path(root).resolve()
        # (kind, repo id) -> the commit id to serve it as (a config's pinned revision); else content-derived
        self.commits = {key: value for key, value in (commits or {}).items()}
        for (kind, repo_id), commit in self.commits.items():
            if kind not in REPO_TYPES or not re.fullmatch(r"[0-9a-f]{40}", commit):
                raise ValueError(f"commits: {kind}/{repo_id}: a commit id is 40 hex digits, got {commit!r}")
        self.requests: list[tuple[str, str, int]] = []
        self._lock = threading.Lock()
        self._repos: dict[tuple[str, str], _Repo] = {}
        self.rescan()
        hub = self

        class Handler(_Handler):
            server_hub = hub

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-hub", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def rescan(self) -> None:
        """Re-read the repositories (their files and commit ids) from `root`."""
        repos = {}
        for kind in REPO_TYPES:
            base = self.root / kind
            for folder in sorted(base.glob("*/*")) if base.is_dir() else []:
                if folder.is_dir():
                    repo_id = folder.relative_to(base).as_posix()
                    repos[kind, repo_id] = _Repo.scan(kind, repo_id, folder, self.commits.get((kind, repo_id)))
        with self._lock:
            self._repos = repos

    def repo(self, kind: str, repo_id: str) -> _Repo | None:
        with self._lock:
            return self._repos.get((kind, repo_id))

    def commit(self, kind: str, repo_id: str) -> str:
        return self._repos[kind, repo_id].sha

    def start(self) -> LocalHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.requests.append((method, path, status))


class _Handler(BaseHTTPRequestHandler):
    server_hub: LocalHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass  # requests are kept in LocalHub.requests

    # ---------------------------------------------------------------- replies

    def _reply(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.server_hub.log(self.command, self.path, status)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status: int = 200, headers: dict | None = None):
        self._reply(status, json.dumps(obj).encode(), headers)

    def _error(self, status: int, code: str, message: str):
        self._json({"error": message}, status, {"X-Error-Code": code, "X-Error-Message": message})

    def _file(self, path: Path, headers: dict):
        data = path.read_bytes()
        size = len(data)
        headers = {**headers, "Accept-Ranges": "bytes", "Last-Modified": formatdate(path.stat().st_mtime, usegmt=True)}
        spec = self.headers.get("Range")
        match = _RANGE.match(spec.strip()) if spec else None
        if match and (match.group(1) or match.group(2)):
            first, last = match.groups()
            if first:
                start, end = int(first), min(int(last) if last else size - 1, size - 1)
            else:
                start, end = max(size - int(last), 0), size - 1
            if start >= size or start > end:
                self._reply(416, b"", {"Content-Range": f"bytes */{size}"})
                return
            self._reply(206, data[start:end + 1], {**headers, "Content-Range": f"bytes {start}-{end}/{size}"},
                        "application/octet-stream")
            return
        self._reply(200, data, headers, "application/octet-stream")

    # ---------------------------------------------------------------- routes

    def do_HEAD(self):  # noqa: N802 - http.server's names
        self._route()

    def do_GET(self):  # noqa: N802
        self._route()

    def do_POST(self):  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        self._body = self.rfile.read(length) if length else b""
        self._route()

    def _route(self):
        try:
            parts = urlsplit(self.path)
            path, query = unquote(parts.path), parse_qs(parts.query)
            api, resolve = _API.match(path), _RESOLVE.match(path)
            if api:
                self._api(api.group(1), api.group(2), api.group(3), api.group(4), query)
            elif resolve:
                self._resolve("datasets" if resolve.group(1) else "models", resolve.group(2), resolve.group(3),
                              resolve.group(4))
            else:
                self._static(path)
        except BrokenPipeError:
            pass

    def _known_repo(self, kind: str, repo_id: str, revision: str | None) -> _Repo | None:
        repo = self.server_hub.repo(kind, repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository not found: {kind}/{repo_id}")
            return None
        if revision not in (None, "main", repo.sha):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo

    def _api(self, kind: str, repo_id: str, action: str | None, rest: str | None, query: dict):
        revision, subpath = None, ""
        if action == "revision":
            revision = rest
        elif action in ("tree", "paths-info"):
            # the revision is URL-quoted as one segment; the rest is a path in the repo
            revision, _, subpath = (rest or "main").partition("/")
        repo = self._known_repo(kind, repo_id, revision)
        if repo is None:
            return
        if action in (None, "revision"):
            self._json(repo.info())
        elif action == "tree":
            entries = repo.tree(subpath, query.get("recursive", ["false"])[0].lower() in ("1", "true"))
            if entries is None:
                self._error(404, "EntryNotFound", f"{subpath} does not exist on {revision}")
            else:
                self._json(entries)
        else:  # paths-info: form or JSON body with `paths`
            body = getattr(self, "_body", b"").decode()
            if self.headers.get("Content-Type", "").startswith("application/json"):
                paths = json.loads(body or "{}").get("paths", [])
            else:
                paths = parse_qs(body).get("paths", [])
            paths = [paths] if isinstance(paths, str) else paths
            dirs = repo.directories()
            entries = []
            for wanted in paths:
                wanted = wanted.strip("/")
                if wanted in repo.files:
                    entries.append(repo.file_entry(wanted))
                elif wanted in dirs or wanted == "":
                    entries.append({"type": "directory", "oid": hashlib.sha1(wanted.encode()).hexdigest(), "size": 0,
                                    "path": wanted})
            self._json(entries)

    def _resolve(self, kind: str, repo_id: str, revision: str, filename: str):
        repo = self._known_repo(kind, repo_id, revision)
        if repo is None:
            return
        if filename not in repo.files:
            self._error(404, "EntryNotFound", f"{filename} does not exist on {revision}")
            return
        oid = repo.oid(filename)
        self._file(repo.files[filename], {"X-Repo-Commit": repo.sha, "ETag": f'"{oid}"'})

    def _static(self, path: str):
        base = (self.server_hub.root / "files").resolve()
        target = (base / path.lstrip("/")).resolve()
        if self.command == "POST" or base not in target.parents or not target.is_file():
            self._reply(404, b"not found", content_type="text/plain")
            return
        self._file(target, {"ETag": f'"{hashlib.sha1(target.read_bytes()).hexdigest()}"'})


def hub_env(url: str, cache: str | Path) -> dict[str, str]:
    """Environment variables that send huggingface_hub, datasets and transformers to the local hub
    at `url`, with their caches under `cache` (created empty by the caller or reused)."""
    cache = Path(cache).resolve()
    return {
        "HF_ENDPOINT": url,
        "HF_HOME": str(cache / "home"),
        "HF_HUB_CACHE": str(cache / "hub"),
        "HF_DATASETS_CACHE": str(cache / "datasets"),
        "HF_HUB_OFFLINE": "0",
        "HF_DATASETS_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
    }

