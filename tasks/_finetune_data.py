"""Fine-tuning data: where its rows come from, how a row becomes text, and how texts become the token
blocks that training reads.

- Where (``data_files``): ``-d`` names a hub dataset (read from the hub's Parquet copy of the split,
  the reader ``--eval_data`` uses), one of the ``datasets`` builders with ``--data_files`` (Olive's
  ``-d json --data_files x.jsonl`` form), or a file / folder itself (local, ``s3://``, ``hf://``).
  Rows are read from JSON lines, JSON, CSV, Parquet or plain text (a row a line, column ``text``).
- How (``render``): one field, a ``str.format`` template over the columns, or the tokenizer's chat
  template over a ``messages`` column. With ``train_on_responses`` the part before the template's
  last field (a chat's non-assistant turns) is kept out of the loss.
- Blocks (``token_blocks``): as Olive's default "join" strategy, samples are concatenated (each ends
  with the tokenizer's end-of-sequence token, so the model learns where an answer stops) and cut into
  ``max_seq_len`` blocks; the last one is padded rather than dropped, so a handful of examples still
  trains. ``max_samples`` counts blocks, as in Olive.
"""

from __future__ import annotations

import hashlib
import json
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grove.errors import InvalidRequest

__all__ = ["BUILDERS", "Blocks", "Sample", "check_text_recipe", "data_files", "data_sha256", "read_rows", "render",
           "row_slice", "template_fields", "token_blocks"]

# The ``datasets`` builders Olive's ``-d`` takes with --data_files, and the file suffixes each reads.
BUILDERS = {"json": (".json", ".jsonl"), "csv": (".csv",), "parquet": (".parquet",), "text": (".txt", ".text")}
_SUFFIXES = tuple(s for suffixes in BUILDERS.values() for s in suffixes)
IGNORE = -100  # the label PyTorch's cross-entropy (and transformers' models) leave out of the loss


def _is_uri(name: str) -> bool:
    return "://" in name


def data_files(data_name: str, split: str, subset: str | None, files: Sequence[str]) -> list[str]:
    """The files (absolute paths or fsspec URIs; a hub split as a glob of its Parquet shards) that
    ``-d data_name --data_files files`` names for ``split``. Raises InvalidRequest naming the fix."""
    if data_name in BUILDERS:
        if not files:
            raise InvalidRequest(f"-d {data_name} reads the files --data_files names, and none is given; pass "
                                 f"--data_files x{BUILDERS[data_name][-1]} (several: comma-separated)")
        return [_local_or_uri(f) for f in files]
    local = Path(data_name).expanduser()
    if _is_uri(data_name) or local.exists() or data_name.lower().endswith(_SUFFIXES):
        if files:
            raise InvalidRequest(f"-d {data_name} is a file or folder; --data_files names files of a hub dataset "
                                 "or of a builder (-d json|csv|parquet|text): pass one or the other")
        if not _is_uri(data_name) and local.is_dir():
            found = sorted(str(p.resolve()) for p in local.iterdir() if p.name.lower().endswith(_SUFFIXES))
            if not found:
                raise InvalidRequest(f"-d {data_name} is a folder with no data file in it ({', '.join(_SUFFIXES)})")
            return found
        return [_local_or_uri(data_name)]
    if data_name.count("/") != 1:
        raise InvalidRequest(f"-d {data_name}: not a file, a folder, a builder ({', '.join(BUILDERS)}) or a hub "
                             "dataset id (org/name); check the name")
    if files:  # files of the dataset's repo, as load_dataset(name, data_files=...) reads them
        return [f"hf://datasets/{data_name}/{f.lstrip('/')}" for f in files]
    # The hub's Parquet copy of every public dataset: <subset>/<split>/NNNN.parquet, one file per shard.
    return [f"hf://datasets/{data_name}@refs/convert/parquet/{subset or 'default'}/{split}/*.parquet"]


def row_slice(rows: str, total: int) -> slice:
    """``datasets``' slice of a split (``:4096``, ``100:200``, ``10%:20%``, negative from the end) over
    ``total`` rows; a percentage rounds to the closest row, as datasets' default rounding does."""
    def bound(text: str) -> int | None:
        if not text:
            return None
        if text.endswith("%"):
            return round(total * int(text[:-1]) / 100)
        return int(text)

    start, _, stop = rows.partition(":")
    return slice(bound(start), bound(stop))


def _local_or_uri(name: str) -> str:
    return name if _is_uri(name) else str(Path(name).expanduser().resolve())


def read_rows(files: Sequence[str], flag: str = "-d") -> list[dict[str, Any]]:
    """Every row of ``files``, in order. Raises InvalidRequest naming the file that cannot be read."""
    from grove.tasks import _data_sources as data_io

    rows: list[dict[str, Any]] = []
    for source in files:
        lower = source.lower()
        if lower.endswith(".parquet"):
            table = data_io.read_table(source, flag)
            names = list(table)
            rows.extend(dict(zip(names, values, strict=True)) for values in zip(*table.values(), strict=True))
        elif lower.endswith((".jsonl", ".csv")):
            rows.extend(data_io.read_rows(source, flag))
        elif lower.endswith(".json"):
            rows.extend(_json_rows(source, data_io.read_raw(source, flag), flag))
        else:  # plain text, as the ``text`` builder reads it: a row a line
            rows.extend({"text": line} for line in data_io.read_raw(source, flag).splitlines() if line.strip())
    return rows


def _json_rows(source: str, raw: str, flag: str) -> list[dict[str, Any]]:
    """A ``.json`` file as ``datasets`` reads one: a list of objects, an object holding one (its
    ``field``, e.g. ``{"data": [...]}``), or JSON lines under a .json name."""
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        try:
            value = [json.loads(line) for line in raw.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"{flag} {source} is neither JSON nor JSON lines ({exc.msg} at line {exc.lineno})"
                                 ) from exc
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        value = lists[0] if len(lists) == 1 else value
    if not isinstance(value, list) or not all(isinstance(row, dict) for row in value):
        raise InvalidRequest(f"{flag} {source}: expected a list of objects (rows), or an object holding one")
    return value


def data_sha256(files: Sequence[str]) -> str:
    """sha256 over the bytes of every file (a glob: every file it matches, in order): the data's identity
    in the cache keys, so a changed file retrains and an unchanged one does not."""
    import fsspec

    from grove.tasks import _data_sources as data_io

    digest = hashlib.sha256()
    for pattern in files:
        for file in data_io.table_files(pattern, "-d"):
            local = data_io._local_copy(file) if _is_uri(file) and not file.startswith("file://") else file  # noqa: SLF001
            try:
                with fsspec.open(local, "rb") as f:
                    while chunk := f.read(1 << 20):
                        digest.update(chunk)
            except OSError as exc:
                raise InvalidRequest(f"-d: {file} cannot be read ({exc.strerror or exc}); check the path") from exc
            digest.update(b"\0")
    return digest.hexdigest()


def check_text_recipe(text_field: str | None, text_template: str | None, use_chat_template: bool,
                      train_on_responses: bool) -> None:
    """How rows become text: at most one recipe, and a prompt to mask only where a recipe marks one.
    Raises ValueError (pydantic reports it against the request's fields)."""
    given = [f for f, on in (("--text_field", text_field is not None), ("--text_template", text_template is not None),
                             ("--use_chat_template", use_chat_template)) if on]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)} each say how a row becomes text: pass one of them")
    if train_on_responses and not (text_template or use_chat_template):
        raise ValueError("--train_on_responses keeps the prompt out of the loss, and only --text_template (its last "
                         "field is the response) or --use_chat_template (the assistant turns) says where the prompt "
                         "ends")


def template_fields(template: str) -> list[str]:
    """The column names a ``str.format`` template reads (``{instruction}``, ``{a[b]}`` reads ``a``)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise InvalidRequest(f"--text_template {template!r} is not a format string ({exc}); write columns as "
                             "{column} and a literal brace as {{ or }}") from exc
    fields = []
    for _, field, _, _ in parsed:
        if field is None:
            continue
        name = field.split(".", 1)[0].split("[", 1)[0]
        if not name or name.isdigit():
            raise InvalidRequest(f"--text_template {template!r}: fields are named by column ({{instruction}}), "
                                 "not by position ({} or {0})")
        fields.append(name)
    return fields


@dataclass(frozen=True)
class Sample:
    """One row's text, and the character spans of it that count in the loss (None: all of it)."""

    text: str
    trained: tuple[tuple[int, int], ...] | None = None


def render(rows: Iterable[dict[str, Any]], *, text_field: str | None, text_template: str | None,
           chat: Any = None, input_cols: Sequence[str] | None = None, train_on_responses: bool = False
           ) -> Iterable[Sample]:
    """Each row as a Sample: its ``text_field``; its ``text_template`` filled in (responses: from the
    last field on); its ``messages`` through ``chat`` (a tokenizer with a chat template; responses: the
    assistant turns); or its ``input_cols`` joined by newlines. A missing column is one error naming it
    and the columns the data has."""
    for number, row in enumerate(rows, 1):
        if text_template is not None:
            yield _from_template(row, text_template, number, train_on_responses)
        elif chat is not None:
            yield _from_chat(row, chat, number, train_on_responses)
        else:
            cols = [text_field] if text_field else list(input_cols or ["text"])
            missing = [c for c in cols if c not in row]
            if missing:
                flag = "--text_field" if text_field else "--input_cols" if input_cols else "the default text column"
                raise InvalidRequest(f"{flag}: the data has no column {missing[0]!r} (row {number}); its columns: "
                                     f"{', '.join(map(str, row))}; name one with --text_field, or build the text "
                                     "with --text_template or --use_chat_template")
            yield Sample("\n".join(str(row[c]) for c in cols))


def _from_template(row: dict[str, Any], template: str, number: int, responses: bool) -> Sample:
    missing = [f for f in template_fields(template) if f not in row]
    if missing:
        raise InvalidRequest(f"--text_template reads the column {missing[0]!r}, which the data does not have (row "
                             f"{number}); its columns: {', '.join(map(str, row))}")
    values = {k: "" if v is None else v for k, v in row.items()}
    text = template.format(**values)
    if not responses:
        return Sample(text)
    parts = list(string.Formatter().parse(template))
    last = max(i for i, (_, field, _, _) in enumerate(parts) if field is not None)
    prompt = "".join(  # the template up to its last field, filled in: the prompt
        literal + ("" if field is None or i == last else format(_field_value(values, field), spec or ""))
        for i, (literal, field, spec, _) in enumerate(parts[:last + 1]))
    return Sample(text, ((len(prompt), len(text)),))


def _field_value(values: dict[str, Any], field: str) -> Any:
    return string.Formatter().get_field(field, (), values)[0]


def _from_chat(row: dict[str, Any], tokenizer: Any, number: int, responses: bool) -> Sample:
    messages = row.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in messages):
        raise InvalidRequest(f"--use_chat_template reads a 'messages' column of [{{role, content}}, ...] turns; row "
                             f"{number} has {'none' if messages is None else type(messages).__name__}; its columns: "
                             f"{', '.join(map(str, row))}")
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    if not responses:
        return Sample(text)
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] == "assistant":
            start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
            end = len(tokenizer.apply_chat_template(messages[:i + 1], tokenize=False))
            spans.append((start, end))
    return Sample(text, tuple(spans))


@dataclass
class Blocks:
    """Token blocks, each ``seq_len`` long: ids, labels (IGNORE where not trained) and attention mask."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    attention_mask: list[list[int]]
    samples: int  # rows that went into them
    tokens: int  # tokens before padding


def token_blocks(samples: Iterable[Sample], tokenizer: Any, seq_len: int, max_blocks: int | None,
                 add_special_tokens: bool = False) -> Blocks:
    """Samples joined (each followed by the end-of-sequence token) and cut into ``seq_len`` blocks, the
    last padded; at most ``max_blocks`` (rows past them are not tokenized)."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    ids: list[int] = []
    labels: list[int] = []
    count = 0
    budget = None if max_blocks is None else max_blocks * seq_len
    for sample in samples:
        encoded = tokenizer(sample.text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        sample_ids = list(encoded["input_ids"])
        if sample.trained is None:
            sample_labels = list(sample_ids)
        else:
            sample_labels = [t if any(s < end and start < e for s, e in sample.trained) else IGNORE
                             for t, (start, end) in zip(sample_ids, encoded["offset_mapping"], strict=True)]
        if eos is not None:
            sample_ids.append(eos)
            sample_labels.append(eos)
        ids += sample_ids
        labels += sample_labels
        count += 1
        if budget is not None and len(ids) >= budget:
            break
    tokens = min(len(ids), budget) if budget is not None else len(ids)
    blocks = Blocks([], [], [], count, tokens)
    for start in range(0, tokens, seq_len):
        chunk, chunk_labels = ids[start:start + seq_len], labels[start:start + seq_len]
        if all(label == IGNORE for label in chunk_labels):
            continue
        fill = seq_len - len(chunk)
        blocks.input_ids.append(chunk + [pad] * fill)
        blocks.labels.append(chunk_labels + [IGNORE] * fill)
        blocks.attention_mask.append([1] * len(chunk) + [0] * fill)
    return blocks
