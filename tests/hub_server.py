"""A Hugging Face Hub on loopback: the part of its HTTP API that ``huggingface_hub`` uses to pin a
revision, download a snapshot (repo info, the recursive tree listing, ``resolve`` HEAD/GET) and
read a file through ``HfFileSystem`` (paths-info, ranged GET), serving model and dataset repos from
local folders. Lets tests run Grove's online hub paths (the tutorial's step 1, ``hf://datasets/``
evaluation text) with the real client, as moto's server does for S3. Dataset repos are keyed
``datasets/<org>/<name>``."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

_KIND = r"(?P<kind>models|datasets)"
_INFO = re.compile(rf"^/api/{_KIND}/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
_TREE = re.compile(rf"^/api/{_KIND}/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?$")
_PATHS_INFO = re.compile(rf"^/api/{_KIND}/(?P<repo>[^/]+/[^/]+)/paths-info/(?P<rev>[^/]+)$")
_RESOLVE = re.compile(r"^/(?P<prefix>datasets/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class HubRepo:
    """One repo: its files (relative path -> bytes) at one commit; ``refs``: other revisions by
    name (e.g. the hub's Parquet copy of a dataset, ``refs/convert/parquet``)."""

    def __init__(self, folder: Path, sha: str, refs: dict[str, HubRepo] | None = None) -> None:
        self.sha = sha
        self.refs = refs or {}
        self.files = {p.relative_to(folder).as_posix(): p.read_bytes()
                      for p in sorted(folder.rglob("*")) if p.is_file()}

    def oid(self, path: str) -> str:  # a git blob id, as the hub reports for non-LFS files
        data = self.files[path]
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # noqa: S324 - git's own id


def _match(pattern: re.Pattern[str], path: str) -> dict[str, str] | None:
    """A route's parts, unquoted, if the quoted ``path`` is that route."""
    m = pattern.match(path)
    return {k: unquote(v) if v is not None else v for k, v in m.groupdict().items()} if m else None


class _Handler(BaseHTTPRequestHandler):
    repos: dict[str, HubRepo] = {}
    moved: dict[str, str] = {}  # an old repo id (datasets/glue) -> its new one (datasets/nyu-mll/glue)
    requests: list[str] = []

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        if not self._redirect():
            self._serve(body=False)

    def do_GET(self) -> None:  # noqa: N802
        if not self._redirect():
            self._serve(body=True)

    def _redirect(self) -> bool:
        """A moved repo, as the hub answers for one renamed (GLUE: glue -> nyu-mll/glue): 307 to the
        same path under the new id, relative."""
        for old, new in self.moved.items():
            kind, _, name = old.rpartition("/")
            for prefix in (f"/api/{kind}/", f"/{kind}/"):
                rest = self.path[len(prefix + name):] if self.path.startswith(prefix + name) else None
                if rest is not None and (not rest or rest[0] in "/@?"):
                    self.requests.append(f"{self.command} {unquote(urlsplit(self.path).path)} -> 307")
                    self.send_response(307)
                    self.send_header("Location", prefix + new.partition("/")[2] + rest)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return True
        return False

    def do_POST(self) -> None:  # noqa: N802 - paths-info
        if self._redirect():
            return
        path = urlsplit(self.path).path  # matched quoted: a revision's slashes arrive as %2F
        self.requests.append(f"POST {unquote(path)}")
        form = parse_qs(self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode())
        m = _match(_PATHS_INFO, path)
        repo = self._repo(self._key(m), m["rev"]) if m else None
        if m is None:
            self._error(404, "RepoNotFound", f"no route {path}")
        elif repo:
            self._json([self._entry(repo, p) for p in form.get("paths", []) if p in repo.files], True)

    def _serve(self, body: bool) -> None:
        path = urlsplit(self.path).path  # matched quoted: a revision's slashes arrive as %2F
        self.requests.append(f"{self.command} {unquote(path)}")
        if m := _match(_TREE, path):
            repo = self._repo(self._key(m), m["rev"])
            if repo:
                recursive = parse_qs(urlsplit(self.path).query).get("recursive") == ["true"]
                self._json(self._listing(repo, m["path"] or "", recursive or not m["path"]), body)
        elif m := _match(_INFO, path):
            repo = self._repo(self._key(m), m["rev"] or "main")
            if repo:
                self._json({"id": m["repo"], "sha": repo.sha,
                            "siblings": [{"rfilename": p} for p in repo.files]}, body)
        elif m := _match(_RESOLVE, path):
            repo = self._repo(("datasets/" if m["prefix"] else "") + m["repo"], m["rev"])
            if repo and m["path"] not in repo.files:
                self._error(404, "EntryNotFound", f"{m['path']} not in {m['repo']}")
            elif repo:
                self._file(repo, m["path"], body)
        else:
            self._error(404, "RepoNotFound", f"no route {path}")

    @staticmethod
    def _key(m: dict[str, str]) -> str:
        return ("datasets/" if m["kind"] == "datasets" else "") + m["repo"]

    @classmethod
    def _listing(cls, repo: HubRepo, folder: str, recursive: bool) -> list[dict[str, object]]:
        """The files under ``folder`` (all of them, or its own files and its subfolders, as the hub lists)."""
        prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
        below = [p for p in repo.files if p.startswith(prefix)]
        if recursive:
            return [cls._entry(repo, p) for p in below]
        folders = sorted({prefix + p[len(prefix):].split("/")[0] for p in below if "/" in p[len(prefix):]})
        return [*({"type": "directory", "path": d, "oid": "0" * 40, "size": 0} for d in folders),
                *(cls._entry(repo, p) for p in below if "/" not in p[len(prefix):])]

    @staticmethod
    def _entry(repo: HubRepo, path: str) -> dict[str, object]:
        return {"type": "file", "path": path, "size": len(repo.files[path]), "oid": repo.oid(path)}

    def _file(self, repo: HubRepo, path: str, body: bool) -> None:
        data, status = repo.files[path], 200
        if (wanted := _RANGE.match(self.headers.get("Range") or "")) and data:
            start, end = int(wanted[1]), int(wanted[2] or len(data) - 1)
            if start >= len(data):
                self._error(416, "RangeNotSatisfiable", f"{start} past {len(data)} bytes")
                return
            data, status = data[start:end + 1], 206
            self.send_response(status)
            self.send_header("Content-Range", f"bytes {start}-{start + len(data) - 1}/{len(repo.files[path])}")
        else:
            self.send_response(status)
        self.send_header("X-Repo-Commit", repo.sha)
        self.send_header("ETag", f'"{repo.oid(path)}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _repo(self, repo_id: str, revision: str) -> HubRepo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
        elif revision in repo.refs:
            return repo.refs[revision]
        elif revision not in ("main", repo.sha):
            self._error(404, "RevisionNotFound", f"Revision {revision} not found")
        else:
            return repo
        return None

    def _json(self, payload: object, body: bool) -> None:
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _error(self, status: int, code: str, message: str) -> None:
        data = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


@contextmanager
def serve_hub(repos: dict[str, HubRepo], moved: dict[str, str] | None = None) -> Iterator[tuple[str, list[str]]]:
    """Serve ``repos`` on 127.0.0.1 (``moved``: old repo ids redirected to new ones); yields (endpoint
    URL, the requests received)."""
    handler = type("Handler", (_Handler,), {"repos": repos, "moved": moved or {}, "requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.requests
    finally:
        server.shutdown()
        server.server_close()
