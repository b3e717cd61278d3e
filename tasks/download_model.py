"""Node ``download-model``: bring a resolved source into the store as a clean Hugging Face
folder (config, safetensors, tokenizer, chat template). GGUF files are dequantized to fp32
here, so every later node sees one format."""

from __future__ import annotations

import contextlib
import functools
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import task
from pydantic import Field

from grove.artifacts import Artifact, Source, StepConfig
from grove.errors import ModelSourceError
from grove.node import RECIPE_CACHE, node_logger, run_node
from grove.store import cache_home, download_file, mark_used
from grove.tasks import _sources
from grove.tasks.architectures import source_spec

__all__ = ["DownloadConfig", "check_safetensors", "download_model", "resolve_source"]


class DownloadConfig(StepConfig):
    NODE = "download-model"
    VERSION = 2  # 2: GGUF head width and Gemma query scale read as llama.cpp reads them
    trust_remote_code: bool = Field(False, description="Olive's flag, recorded; no model code is fetched or run "
                                    "(every supported architecture is native to transformers)")


@task(name="resolve-source", retries=2, retry_delay_seconds=[2, 5], persist_result=False)
def resolve_source(name_or_path: str, revision: str | None = None) -> Source:
    """Pin the source to exact bytes (hub commit or file hashes). Never cached: this is what
    detects upstream change."""
    source = _sources.resolve(name_or_path, revision)
    # Unsupported architectures (and GGUFs transformers cannot read) stop here, before any download.
    source_spec(source)
    return source


@task(name="download-model", cache_policy=RECIPE_CACHE, retries=0)
def download_model(source: Source, config: DownloadConfig, store: str) -> Artifact:
    return run_node(config, [source], store, lambda _inputs, cfg, out: _download(source, cfg, out))


def _download(source: Source, config: DownloadConfig, out: Path) -> dict[str, object]:
    log = node_logger()
    if source.kind == "gguf":
        _convert_gguf(Path(source.location), out)
    else:
        folder = _fetch_folder(source, config)
        for rel in source.files:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / rel, out / rel)
        check_safetensors(out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log.info("model %s (%s) ready: %.1f MB", source.location, source.model_type, size / 1e6)
    return {"model_type": source.model_type, "source": source.location, "source_digest": source.digest}


def _fetch_folder(source: Source, config: DownloadConfig) -> Path:
    if source.kind == "local":
        return Path(source.location)
    if source.kind == "hub":
        from huggingface_hub import snapshot_download

        # Exactly the files resolve listed (and pinned by the commit): e.g. the weights in one format.
        return Path(snapshot_download(source.location, revision=source.revision, allow_patterns=source.files))
    from grove.store import ArtifactStore

    s3 = ArtifactStore(source.location)
    local = cache_home() / "s3-sources" / source.digest
    for rel in source.files:
        if not (local / rel).exists():  # the folder is keyed by the objects' ETags: a file there is complete
            download_file(s3.fs, f"{s3.root}/{rel}", local / rel)  # two runs at once (a fleet's targets): safe
    mark_used(local)
    return local


def check_safetensors(folder: Path) -> None:
    """Read every safetensors header and check the file holds all the bytes it declares. Any file that
    is not one (random bytes, say: half of them declare a header longer than 2^63 bytes) is one error."""
    import json
    import struct

    for path in folder.rglob("*.safetensors"):
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > size - 8:  # checked before the read: a length past 2^63 cannot even be asked for
                    raise ValueError(f"its header declares {n} bytes, the file has {size}")
                header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise ValueError("its header is not a JSON object")
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if size < 8 + n + end:
                raise ValueError(f"file has {size} bytes, header declares {8 + n + end}")
        except (ValueError, KeyError, IndexError, TypeError, struct.error, UnicodeDecodeError, MemoryError) as exc:
            raise ModelSourceError(f"'{path.name}' is not a valid safetensors file ({exc}); the weights are "
                                   "corrupt or truncated: download the model again") from exc


def _convert_gguf(path: Path, out: Path) -> None:
    """Dequantize a GGUF to an fp32 safetensors folder with its tokenizer and chat template."""
    try:
        model, tokenizer = _load_gguf_once(path)
    except (ImportError, AttributeError, TypeError, KeyError):
        model, tokenizer = _load_gguf_public(path)  # transformers' internals moved: slower public path
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for bad files
        raise ModelSourceError(f"transformers could not load '{path}' ({exc.__class__.__name__}: {exc}); "
                               "the GGUF is corrupt or of an architecture transformers cannot dequantize") from exc
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _load_gguf_once(path: Path) -> tuple[Any, Any]:
    # transformers 5.24's public from_pretrained(gguf_file=...) parses the GGUF header about five
    # times (config, model, tokenizer; ~2.5 s each here) and then refuses to save_pretrained a
    # GGUF-loaded model. Its own loader, called directly, needs two parses: metadata, then
    # tensors mapped onto a weightless (meta) model of the right config.
    import torch
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM, PreTrainedTokenizerFast
    from transformers.integrations.gguf import convert_gguf_tokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with _memoized_gguf():
        meta = load_gguf_checkpoint(str(path), return_tensors=False)
        config_dict = dict(meta["config"])
        model_type = config_dict.pop("model_type")
        config_dict |= _config_fixes(path, config_dict)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(CONFIG_MAPPING[model_type](**config_dict), dtype=torch.float32)
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model,
                                       torch_dtype=torch.float32)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    if unexpected or any(p.is_meta for p in model.parameters()):
        raise ModelSourceError(f"'{path}': GGUF tensors do not match the config (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})")
    vocab = meta["tokenizer"]
    fast, extra = convert_gguf_tokenizer(model_type, vocab)
    specials = {f"{n}_token": vocab["tokens"][vocab[f"{n}_token_id"]] for n in ("bos", "eos", "unk", "pad")
                if vocab.get(f"{n}_token_id") is not None}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=fast, **meta["tokenizer_config"], **extra, **specials)
    return model, tokenizer


def _config_fixes(path: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Config fields transformers 5.24 leaves at the config class's defaults, read from the GGUF as
    llama.cpp reads them: the attention head width (Qwen3's mapping skips ``attention.key_length``:
    a Qwen3 whose heads are not 128 wide failed to load) and Gemma 2 / 3's query scale (transformers
    keeps 256; llama.cpp scales by the head width, by hidden / heads for the 27B models, which it
    knows by their layer count)."""
    import gguf

    # Inside _memoized_gguf (_load_gguf_once) this is the cached header transformers parsed; the
    # public fallback path, which parses the file several times anyway, parses it once more.
    fields = gguf.GGUFReader(str(path)).fields
    arch = _sources.gguf_value(fields, "general.architecture")
    fixes: dict[str, Any] = {}
    head_dim = _sources.gguf_value(fields, f"{arch}.attention.key_length")
    if head_dim and config.get("head_dim") != head_dim:
        fixes["head_dim"] = head_dim
    if arch in ("gemma2", "gemma3"):
        big = (arch, config.get("num_hidden_layers")) in (("gemma2", 46), ("gemma3", 62))
        fixes["query_pre_attn_scalar"] = (config["hidden_size"] // config["num_attention_heads"] if big
                                          else head_dim or config.get("head_dim"))
    return fixes


@contextlib.contextmanager
def _memoized_gguf() -> Iterator[None]:
    """transformers 5.24 parses the GGUF header on every call (~3 s here) and builds gguf's
    tensor-name map once per module (~400 times, ~5 s). Both are pure functions of their
    arguments, so memoize them for one conversion (with the faster reader of _sources), and decode
    GGUF strings with one ``bytes.decode`` instead of a list of ints per string (98k strings:
    0.7 s -> 0.05 s), and dequantize in groups of ~64 KB of blocks rather than 16 rows (SmolLM2:
    1.2 s -> 0.6 s); then restore gguf and transformers as they were."""
    import gguf
    import gguf.quants
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    reader, name_map, parse = gguf.GGUFReader, gguf.get_tensor_name_map, gguf_utils._gguf_parse_value  # noqa: SLF001 - patched for this load only, restored below
    grouped = getattr(gguf.quants, "_apply_over_grouped_rows", None)

    def parse_value(value: Any, data_type: Any) -> Any:
        types = data_type if isinstance(data_type, list) else [data_type]
        if types in ([8], [9, 8]):  # a string, alone or as an array element
            return bytes(value).decode()
        return parse(value, data_type)

    gguf.GGUFReader = functools.lru_cache(maxsize=2)(_sources.fast_gguf_reader(reader))  # type: ignore[misc,assignment]
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=8)(name_map)
    gguf_utils._gguf_parse_value = parse_value  # noqa: SLF001
    if grouped is not None:
        gguf.quants._apply_over_grouped_rows = _sources.apply_over_row_groups  # noqa: SLF001
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map  # type: ignore[misc]
        gguf_utils._gguf_parse_value = parse  # noqa: SLF001
        if grouped is not None:
            gguf.quants._apply_over_grouped_rows = grouped  # noqa: SLF001


def _load_gguf_public(path: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    for field, value in _config_fixes(path, config.to_dict()).items():
        setattr(config, field, value)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, config=config, dtype=torch.float32)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=False, assign=True)
    model.tie_weights()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)
