"""Content-addressed artifact store over fsspec (``file://`` and ``s3://``).

Layout under the store root::

    artifacts/<node>/<digest>/<files...>
    artifacts/<node>/<digest>/manifest.json      <- written last: the commit point
    prefect-results/<node>-<digest>               <- Prefect's cache record (JSON)
    models/<name>/<target>/<version>/             <- fleet refresh's published outputs
    models/<name>/<target>/latest.json            <- moved last, in one write

An artifact exists only once its manifest exists and every file it lists has the listed
size. Anything else (a crashed upload, a deleted file) is treated as absent and rebuilt. On this
machine (a local store, and the copies fetched from a remote one) every file is also checked against
the manifest's sha256: a file changed behind the store's back, even to the same size, is never served
as good; its artifact is dropped, with a warning, and rebuilt (or fetched again). A file is hashed once:
its size, mtime, inode and ctime when it was last found good are kept in ``cache_home()/checked``, and it
is hashed again only when one of them changes (a write changes the ctime even where it restores the mtime).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from grove.errors import StoreError

if TYPE_CHECKING:
    import fsspec

__all__ = ["ArtifactStore", "FileEntry", "Manifest", "cache_home", "default_store_uri", "download_file", "file_lock",
           "lineage_of", "mark_used", "sha256_file", "unreachable"]

MANIFEST = "manifest.json"
_CHUNK = 8 * 1024 * 1024


def cache_home() -> Path:
    """This machine's Grove caches: ``$XDG_CACHE_HOME/grove`` (``~/.cache/grove``)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "grove"


def download_file(fs: fsspec.AbstractFileSystem, remote: str, local: Path) -> None:
    """Copy ``remote`` (on ``fs``) to ``local`` through a file beside it whose name is this call's own,
    renamed into place: an interrupted download never passes for the file, and two processes
    fetching the same file at once each rename a whole copy."""
    local.parent.mkdir(parents=True, exist_ok=True)
    partial = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        fs.get_file(remote, str(partial))
        partial.replace(local)
    finally:
        partial.unlink(missing_ok=True)


def mark_used(folder: Path) -> None:
    """Record that a copy in this machine's caches was just used (its folder's mtime), so that
    ``grove store prune --older-than`` removes what has not been used, not what was fetched long ago."""
    with contextlib.suppress(OSError):  # removed meanwhile, or not ours to touch: only a pruning hint is lost
        os.utime(folder)


def default_store_uri() -> str:
    """``$GROVE_STORE`` or ``~/.cache/grove/store``."""
    return os.environ.get("GROVE_STORE") or str(cache_home() / "store")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class FileEntry(BaseModel):
    model_config = ConfigDict(frozen=True)
    path: str
    size: int
    sha256: str


class Manifest(BaseModel):
    """What an artifact is, where it came from, and what it measured."""

    model_config = ConfigDict(frozen=True)
    node: str
    node_version: int
    digest: str
    config: dict[str, object] = Field(default_factory=dict)
    inputs: list[str] = Field(default_factory=list, description="digests of the input artifacts")
    files: list[FileEntry]
    metrics: dict[str, object] = Field(default_factory=dict)
    created_at: float
    seconds: float = Field(description="wall time the node took to build this artifact")
    ancestors: list[dict[str, object]] = Field(default_factory=list, description="the lineage facts of every "
                                               "artifact upstream of this one, upstream first (lineage_of)")


LINEAGE_KEYS = ("node", "node_version", "digest", "inputs", "config", "seconds")


def lineage_of(folders: list[Path]) -> list[dict[str, object]]:
    """Every artifact behind these local artifact folders, and they themselves: what built each, from
    what (``inputs``: digests; a download's is its source's), how long it took. Upstream first, each
    once. Read from the folders' manifests, which carry their own ancestors (none before Grove
    recorded them: such an artifact's lineage starts at itself)."""
    seen: set[tuple[object, object]] = set()
    steps: list[dict[str, object]] = []
    for folder in folders:
        manifest = json.loads((folder / MANIFEST).read_text())
        for step in [*manifest.get("ancestors", []), {k: manifest[k] for k in LINEAGE_KEYS}]:
            if (step["node"], step["digest"]) not in seen:
                seen.add((step["node"], step["digest"]))
                steps.append(step)
    return steps


class ArtifactStore:
    """One store root. Cheap to construct; holds an fsspec filesystem."""

    def __init__(self, uri: str | None = None) -> None:
        import fsspec.core

        uri = uri or default_store_uri()
        if "://" not in uri:
            uri = str(Path(uri).expanduser().resolve())
        protocol, sep, path = uri.partition("://")
        if sep and not path.strip("/"):  # "s3://": without a bucket the URI would name a local folder "s3:"
            raise StoreError(f"artifact store {uri} names no location; pass {protocol}://<bucket>/<prefix>")
        self.uri = uri.rstrip("/")
        try:
            fs, root = fsspec.core.url_to_fs(self.uri, **_storage_options(self.uri))
        except (ImportError, ValueError) as exc:  # a protocol fsspec does not know, or whose package is missing
            raise StoreError(f"artifact store {uri} cannot be opened ({exc}); Grove's stores are a local folder "
                             "or s3://bucket/prefix (any S3-compatible server via AWS_ENDPOINT_URL)") from exc
        self.fs: fsspec.AbstractFileSystem = fs
        self.root: str = root.rstrip("/")
        from fsspec.implementations.local import LocalFileSystem

        self.is_local = isinstance(fs, LocalFileSystem)

    # -- paths ------------------------------------------------------------------------------
    def artifact_path(self, node: str, digest: str) -> str:
        return f"{self.root}/artifacts/{node}/{digest}"

    def local_path(self, node: str, digest: str) -> Path:
        if not self.is_local:
            raise StoreError(f"{self.uri} is not a local store")
        return Path(self.artifact_path(node, digest))

    def check_reachable(self) -> None:
        """Raise StoreError naming the cause if the store cannot be written. On S3 the probe gives up
        after two attempts of 10 s each (the work itself keeps botocore's and s3fs's retries): an
        endpoint that is down fails in seconds, not after the ~40 s of their back-off."""
        probe = f"{self.root}/.grove-probe-{uuid.uuid4().hex}"
        fs = self.fs
        if self.uri.startswith("s3://"):
            import fsspec

            fs = fsspec.filesystem("s3", skip_instance_cache=True, **_storage_options(self.uri),
                                   config_kwargs={"connect_timeout": 10, "read_timeout": 10,
                                                  "retries": {"max_attempts": 2, "mode": "standard"}})
            fs.retries = 1  # s3fs's own retry loop around botocore's (5 by default)
        try:
            fs.makedirs(self.root, exist_ok=True)
            fs.pipe(probe, b"ok")
            fs.rm(probe)
        except Exception as exc:  # noqa: BLE001 - any backend failure means "unusable store"
            raise StoreError(f"artifact store {self.uri} is not usable: {exc.__class__.__name__}: {exc}; "
                             f"{self._hint()}") from exc

    def _hint(self) -> str:
        if self.uri.startswith("s3://"):
            return "check AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and that the bucket exists"
        return "check the path exists and is writable, or pass --store"

    @contextlib.contextmanager
    def reaching(self) -> Iterator[None]:
        """A connection to the store that failed after the S3 client's own retries (botocore's, then
        s3fs's, with backoff: about a minute for a server that is down) is one StoreError naming the
        store, not a traceback from deep in the client."""
        try:
            yield
        except StoreError:
            raise
        except Exception as exc:
            if not unreachable(exc):
                raise
            raise StoreError(f"artifact store {self.uri} cannot be reached ({exc.__class__.__name__}: {exc}); "
                             f"{self._hint()}; the steps already stored are kept, so the same command resumes "
                             "once it is back") from exc

    def listing(self, path: str) -> dict[str, dict[str, object]]:
        """Every file under ``path`` (a full path in this store) with its listing info; {} if none.
        StoreError, naming the cause, if the store cannot be listed."""
        try:
            return dict(self.fs.find(path, detail=True)) if self.fs.exists(path) else {}
        except Exception as exc:  # noqa: BLE001 - any backend failure: the store cannot be read
            raise StoreError(f"artifact store {self.uri} cannot be listed: {exc.__class__.__name__}: {exc}; "
                             f"{self._hint()}") from exc

    # -- read side --------------------------------------------------------------------------
    def manifest(self, node: str, digest: str) -> Manifest | None:
        """The manifest if the artifact is complete, else None (a partial artifact is absent)."""
        with self.reaching():
            return self._manifest(node, digest)

    def _manifest(self, node: str, digest: str) -> Manifest | None:
        base = self.artifact_path(node, digest)
        try:
            raw = self.fs.cat_file(f"{base}/{MANIFEST}")
        except FileNotFoundError:
            return None
        try:
            manifest = Manifest.model_validate_json(raw)
        except ValueError:
            return None
        try:
            listing = {
                _relative(info["name"], base): int(info.get("size") or 0)
                for info in self.fs.find(base, detail=True).values()
            }
        except FileNotFoundError:
            return None
        for entry in manifest.files:
            if listing.get(entry.path) != entry.size:
                return None
        if self.is_local and not _checked(manifest, Path(base), raw):
            with contextlib.suppress(FileNotFoundError):  # absent to every reader from now on; rebuilt whole
                self.fs.rm(f"{base}/{MANIFEST}")
            return None
        return manifest

    def fetch(self, node: str, digest: str, cache_dir: Path | None = None) -> Path:
        """A local folder holding the artifact's files (the store itself when local)."""
        manifest = self.manifest(node, digest)
        if manifest is None:
            raise StoreError(f"artifact {node}/{digest[:12]} is missing or incomplete in {self.uri}")
        if self.is_local:
            return Path(self.artifact_path(node, digest))
        cache_dir = cache_dir or cache_home() / "fetched"
        dest = cache_dir / node / digest
        if self._good_copy(manifest, dest):
            mark_used(dest)
            return dest
        # One download per machine: runs that need the same artifact at once (a fleet's targets on
        # one box's workers) wait for the first one's copy instead of downloading it again.
        with file_lock(_ensure(cache_dir / node) / f".{digest}.lock"), self.reaching():
            if self._good_copy(manifest, dest):
                return dest
            shutil.rmtree(dest, ignore_errors=True)  # a damaged copy, if any: fetched again
            self._download(manifest, dest)
        return dest

    @staticmethod
    def _good_copy(manifest: Manifest, dest: Path) -> bool:
        """Whether this machine's fetched copy is whole and every file still matches the manifest."""
        if not (dest / MANIFEST).exists():
            return False
        return all((dest / e.path).is_file() for e in manifest.files) and _checked(manifest, dest,
                                                                                  (dest / MANIFEST).read_bytes())

    def _download(self, manifest: Manifest, dest: Path) -> None:
        node, digest = manifest.node, manifest.digest
        staging = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}-", dir=dest.parent))
        for entry in manifest.files:
            target = staging / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(f"{self.artifact_path(node, digest)}/{entry.path}", str(target))
            if sha256_file(target) != entry.sha256:
                shutil.rmtree(staging, ignore_errors=True)
                raise StoreError(f"{node}/{digest[:12]}/{entry.path}: checksum mismatch after download")
        (staging / MANIFEST).write_text(manifest.model_dump_json(indent=2))
        try:
            staging.rename(dest)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(staging, ignore_errors=True)
            return
        _record_checked(dest, (dest / MANIFEST).read_bytes(), manifest)  # just hashed: no need to again

    # -- write side -------------------------------------------------------------------------
    def commit(
        self,
        local_dir: Path,
        *,
        node: str,
        node_version: int,
        digest: str,
        config: dict[str, object],
        inputs: list[str],
        metrics: dict[str, object],
        seconds: float,
        ancestors: list[dict[str, object]] | None = None,
    ) -> Manifest:
        """Upload every file of ``local_dir``, then the manifest. Returns the manifest."""
        files = sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
        if not files:
            raise StoreError(f"node {node} produced no files")
        entries = [
            FileEntry(path=p.relative_to(local_dir).as_posix(), size=p.stat().st_size, sha256=sha256_file(p))
            for p in files
        ]
        manifest = Manifest(
            node=node,
            node_version=node_version,
            digest=digest,
            config=config,
            inputs=inputs,
            files=entries,
            metrics=metrics,
            created_at=time.time(),
            seconds=round(seconds, 3),
            ancestors=ancestors or [],
        )
        base = self.artifact_path(node, digest)
        try:
            if self.is_local:
                self._commit_local(local_dir, Path(base), manifest)
            else:
                for path, entry in zip(files, entries, strict=True):
                    self.fs.put_file(str(path), f"{base}/{entry.path}")
                self.fs.pipe(f"{base}/{MANIFEST}", manifest.model_dump_json(indent=2).encode())
        except Exception as exc:  # no manifest was written: nothing of it is visible to a reader
            if unreachable(exc) or not isinstance(exc, OSError):
                with self.reaching():  # a failed connection: StoreError naming the store; the rest as it is
                    raise
            size_mb = sum(e.size for e in entries) / 1e6
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreError(f"artifact store {self.uri} is full: no space left for {node}/{digest[:12]} "
                                 f"({size_mb:.1f} MB); free space there (grove store prune) or pass another "
                                 "--store; the steps already stored are kept, so the same command resumes") from exc
            raise StoreError(f"artifact store {self.uri} cannot take {node}/{digest[:12]} ({size_mb:.1f} MB): "
                             f"{exc.__class__.__name__}: {exc}; {self._hint()}") from exc
        return manifest

    def _commit_local(self, local_dir: Path, base: Path, manifest: Manifest) -> None:
        # Stage beside the final place, then rename: readers see all files or none.
        base.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{base.name[:12]}-", dir=base.parent))
        try:
            for entry in manifest.files:
                src, dst = local_dir / entry.path, staging / entry.path
                dst.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(src, dst)  # same filesystem: free; node outputs are never modified again
                except OSError:
                    shutil.copy2(src, dst)
            (staging / MANIFEST).write_text(manifest.model_dump_json(indent=2))
        except BaseException:  # a full disk, say: no half copy left to fill it
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if self.manifest(manifest.node, manifest.digest) is not None:
            # A concurrent identical commit landed first, whole (a fleet's targets share the download
            # and reference nodes): keep it, its readers may be using it; ours holds the same bytes.
            shutil.rmtree(staging, ignore_errors=True)
            return
        if base.exists():  # an incomplete or damaged artifact: replaced whole
            shutil.rmtree(base, ignore_errors=True)
        try:
            staging.rename(base)
        except OSError:  # another commit renamed into place between the check and here
            shutil.rmtree(staging, ignore_errors=True)
            return
        _record_checked(base, (base / MANIFEST).read_bytes(), manifest, ctime=False)  # hashed by commit()

    def remove(self, node: str, digest: str) -> None:
        """Remove an artifact: its manifest first (absent to every reader from then on), then its
        Prefect cache record, its files, and this machine's fetched copy (remote stores)."""
        base = self.artifact_path(node, digest)
        if self.fs.exists(f"{base}/{MANIFEST}"):
            self.fs.rm(f"{base}/{MANIFEST}")
        self.drop_result_record(f"{node}-{digest}")
        if self.fs.exists(base):
            self.fs.rm(base, recursive=True)
        if not self.is_local:
            shutil.rmtree(cache_home() / "fetched" / node / digest, ignore_errors=True)

    # -- Prefect result records -------------------------------------------------------------
    @property
    def results_uri(self) -> str:
        """Prefect's result-record folder: a plain path for a local store (Prefect's LocalFileSystem
        reads 'file:///x' as a relative folder 'file:/x' under the working directory), else the URI."""
        return f"{self.root}/prefect-results" if self.is_local else f"{self.uri}/prefect-results"

    def drop_result_record(self, key: str) -> None:
        path = f"{self.root}/prefect-results/{key}"
        with self.reaching():
            if self.fs.exists(path):
                self.fs.rm(path)


def unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` is a connection to the store that failed (refused, reset, timed out)."""
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
    except ImportError:  # no S3 client: only the OS's own
        return isinstance(exc, ConnectionError)
    return isinstance(exc, (BotoConnectionError, ConnectionError))


def _checked_record(folder: Path) -> Path:
    return cache_home() / "checked" / f"{hashlib.sha256(str(folder).encode()).hexdigest()[:32]}.json"


def _signature(path: Path) -> list[int | None]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def _same(known: list[int | None] | None, now: list[int | None]) -> bool:
    """A recorded ctime of None (just committed: the node's work folder, whose hard link's removal
    changes the ctime, was still there) matches any ctime once."""
    return known is not None and len(known) == len(now) and known[:3] == now[:3] and known[3] in (None, now[3])


def _record_checked(folder: Path, raw_manifest: bytes, manifest: Manifest, ctime: bool = True) -> None:
    """Remember that ``folder``'s files matched ``manifest`` as they are now (size, mtime, inode, ctime)."""
    with contextlib.suppress(OSError):  # a cache only: without it, files are hashed again
        files = {e.path: _signature(folder / e.path) for e in manifest.files}
        if not ctime:  # not yet: see _same
            for signature in files.values():
                signature[3] = None
        record = {"manifest": hashlib.sha256(raw_manifest).hexdigest(), "files": files}
        path = _checked_record(folder)
        _ensure(path.parent)
        partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        partial.write_text(json.dumps(record))
        partial.replace(path)


def _checked(manifest: Manifest, folder: Path, raw_manifest: bytes) -> bool:
    """Whether every file of the artifact in ``folder`` matches the manifest's sha256. Files unchanged
    since they were last found good (same size, mtime, inode and ctime) are not hashed again. A mismatch is
    logged as a warning naming the file."""
    try:
        record = json.loads(_checked_record(folder).read_text())
        known = record["files"] if record["manifest"] == hashlib.sha256(raw_manifest).hexdigest() else {}
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError, KeyError, TypeError):
        known = {}
    update = False  # the record is to be written: a file hashed, or a ctime to pin
    for entry in manifest.files:
        path = folder / entry.path
        try:
            now = _signature(path)
            if _same(known.get(entry.path), now):
                update = update or known[entry.path][3] is None
                continue
            good = sha256_file(path) == entry.sha256
        except OSError:
            return False  # gone meanwhile: absent, as any incomplete artifact
        if not good:
            logging.getLogger("grove").warning(
                "%s/%s: %s does not match its sha256 in the manifest (it was changed after the artifact was "
                "committed); not using it: the artifact is built (or fetched) again", manifest.node,
                manifest.digest[:12], entry.path)
            return False
        update = True
    if update:
        _record_checked(folder, raw_manifest, manifest)
    return True


def _relative(name: str, base: str) -> str:
    name = name.replace("\\", "/")
    base = base.replace("\\", "/").rstrip("/")
    idx = name.find(base)
    return name[idx + len(base) + 1 :] if idx >= 0 else name


@contextlib.contextmanager
def file_lock(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """An exclusive lock between the threads and processes of this machine (flock: released by the
    kernel if the holder dies). ``on_wait`` is called once if another holder makes us wait."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _storage_options(uri: str) -> dict[str, object]:
    # s3fs reads AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY itself; the endpoint is explicit so
    # that MinIO, rclone or moto work with the same variable the AWS CLI uses.
    if uri.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
        opts: dict[str, object] = {"use_listings_cache": False}
        if endpoint:
            opts["endpoint_url"] = endpoint
        return opts
    return {}
