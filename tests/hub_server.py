"""A Hugging Face Hub on loopback: the part of its HTTP API that ``huggingface_hub`` uses to pin a
revision and download a snapshot (model info, the recursive tree listing, ``resolve`` HEAD/GET),
serving repos from local folders. Lets tests run Grove's online hub path (the tutorial's step 1)
with the real client, as moto's server does for S3."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


class HubRepo:
    """One repo: its files (relative path -> bytes) at one commit."""

    def __init__(self, folder: Path, sha: str) -> None:
        self.sha = sha
        self.files = {p.relative_to(folder).as_posix(): p.read_bytes()
                      for p in sorted(folder.rglob("*")) if p.is_file()}

    def oid(self, path: str) -> str:  # a git blob id, as the hub reports for non-LFS files
        data = self.files[path]
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # noqa: S324 - git's own id


class _Handler(BaseHTTPRequestHandler):
    repos: dict[str, HubRepo] = {}
    requests: list[str] = []

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self._serve(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        self.requests.append(f"{self.command} {path}")
        if m := _TREE.match(path):
            repo = self._repo(m["repo"], m["rev"])
            if repo:
                self._json([{"type": "file", "path": p, "size": len(d), "oid": repo.oid(p)}
                            for p, d in repo.files.items()], body)
        elif m := _INFO.match(path):
            repo = self._repo(m["repo"], m["rev"] or "main")
            if repo:
                self._json({"id": m["repo"], "sha": repo.sha,
                            "siblings": [{"rfilename": p} for p in repo.files]}, body)
        elif m := _RESOLVE.match(path):
            repo = self._repo(m["repo"], m["rev"])
            if repo and m["path"] not in repo.files:
                self._error(404, "EntryNotFound", f"{m['path']} not in {m['repo']}")
            elif repo:
                data = repo.files[m["path"]]
                self.send_response(200)
                self.send_header("X-Repo-Commit", repo.sha)
                self.send_header("ETag", f'"{repo.oid(m["path"])}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)
        else:
            self._error(404, "RepoNotFound", f"no route {path}")

    def _repo(self, repo_id: str, revision: str) -> HubRepo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
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
def serve_hub(repos: dict[str, HubRepo]) -> Iterator[tuple[str, list[str]]]:
    """Serve ``repos`` on 127.0.0.1; yields (endpoint URL, the requests received)."""
    handler = type("Handler", (_Handler,), {"repos": repos, "requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.requests
    finally:
        server.shutdown()
        server.server_close()
