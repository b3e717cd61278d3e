"""Where evaluation and calibration text comes from: the built-in text, local or remote files, tables
(Parquet, JSON lines, CSV; a hub dataset's Parquet copy) and the columns named after a source
(``SOURCE#text=...,label=...``). Shared by the decoder and encoder paths, fine-tuning and the shell's
preflight checks."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["BUILTIN_TEXT", "COLUMNS_HELP", "LABEL_COLUMNS", "TEXT_COLUMNS", "Columns", "is_row_file", "is_table",
           "pick_column", "read_columns", "read_raw", "read_rows", "read_table", "read_text", "split_columns",
           "table_files", "table_label_names", "text_sha256"]

BUILTIN_TEXT = "builtin:GPL-3"


@dataclass(frozen=True)
class Columns:
    """The columns a data source's ``#text=...,label=...`` suffix names (``split_columns``): ``text``,
    one column, or two for a sentence pair (a token classifier's: its words); ``label``, the label,
    score or tags column. Empty: Grove finds them by their usual names."""

    text: tuple[str, ...] = ()
    label: str | None = None

    def suffix(self) -> str:
        """``#text=...,label=...`` naming these columns ('' for none), as ``split_columns`` reads it back.
        Raises ValueError for a name the suffix cannot carry (not a string, empty, or holding one of ``# , = +``)."""
        if bad := [c for c in (*self.text, *([self.label] if self.label is not None else []))
                   if not isinstance(c, str) or not c or any(ch in c for ch in _SUFFIX_SIGNS)]:
            raise ValueError(f"column names {bad} hold one of {' '.join(_SUFFIX_SIGNS)} (or are not names)")
        parts = ([f"text={'+'.join(self.text)}"] if self.text else []) + ([f"label={self.label}"] if self.label else [])
        return "#" + ",".join(parts) if parts else ""


# <source>#text=<column>[+<column>][,label=<column>]: '+' and ',' so that a shell needs no quotes.
_SUFFIX_SIGNS = "#,=+"
_COLUMNS_SUFFIX = re.compile(r"#((?:text|label)=[^#,=+]+(?:\+[^#,=+]+)*(?:,(?:text|label)=[^#,=+]+(?:\+[^#,=+]+)*)*)$")
COLUMNS_HELP = ("name a table's columns after the source, SOURCE#text=<column>,label=<column> (text=<first>+<second> "
                "for a sentence pair; label= where labels are read), e.g. reviews.csv#text=review,label=stars")


def split_columns(source: str, flag: str = "--eval_data") -> tuple[str, Columns]:
    """``source`` without its ``#text=<column>[+<column>][,label=<column>]`` suffix, and the columns it
    names (Olive configs' ``input_cols`` / ``label_col``, flows/olive_config.py). A source without
    the suffix names none. Raises InvalidRequest for a key given twice."""
    from grove.errors import InvalidRequest

    if not (match := _COLUMNS_SUFFIX.search(source)):
        return source, Columns()
    fields: dict[str, str] = {}
    for part in match.group(1).split(","):
        key, value = part.split("=", 1)
        if key in fields:
            raise InvalidRequest(f"{flag} {source}: {key}= is given twice; {COLUMNS_HELP}")
        fields[key] = value
    text = tuple(fields["text"].split("+")) if "text" in fields else ()
    if len(text) > 2:
        raise InvalidRequest(f"{flag} {source}: text= names {len(text)} columns; Grove reads one text or a "
                             "sentence pair (two)")
    return source[:match.start()], Columns(text, fields.get("label"))


def read_text(source: str, flag: str = "--eval_data") -> str:
    """'builtin:GPL-3' (the GNU GPL v3 text shipped with Grove), a local path, or an fsspec URI
    (``s3://``, ``hf://datasets/...``). A table (``.parquet``, how the hub stores datasets: wikitext,
    sst2...; or ``.jsonl`` / ``.csv`` rows) reads as its text column's rows joined by blank lines, as
    transformers' perplexity guide joins wikitext; the text column is the one ``#text=<column>`` names,
    else the first of ``TEXT_COLUMNS`` it has (a ``label=`` column does not matter here). A source that
    cannot be read raises InvalidRequest naming ``flag``; for a remote one, whatever its client raised
    (no network, no such dataset) is reported the same way."""
    from grove.errors import InvalidRequest

    path, columns = split_columns(source, flag)
    if len(columns.text) > 1 or (columns.text and not (is_table(path) or is_row_file(path))):
        raise InvalidRequest(f"{flag} {source}: this text is read from one column of a .parquet, .jsonl or .csv "
                             "table; name one with #text=<column>")
    if path == BUILTIN_TEXT:
        return (resources.files("grove") / "data" / "GPL-3.txt").read_text(encoding="utf-8")
    if is_table(path) or is_row_file(path):
        table = read_columns(path, flag)
        return "\n\n".join(str(row) for row in table[pick_column(table, columns.text or TEXT_COLUMNS, path, flag)]
                            if row is not None)
    return read_raw(path, flag)


def read_raw(source: str, flag: str = "--eval_data", encoding: str = "utf-8", newline: str | None = None) -> str:
    """A file's own text, whatever its suffix (a path or an fsspec URI); InvalidRequest naming ``flag``
    if it cannot be read."""
    import fsspec

    remote = _is_remote(source)
    try:
        local = _local_copy(source) if remote else source
        with fsspec.open(local, "r", encoding=encoding, newline=newline) as f:
            return str(f.read())
    except Exception as exc:
        if not (remote or isinstance(exc, (OSError, UnicodeDecodeError))):
            raise
        raise _unreadable(source, flag, exc, "UTF-8 text", "pass a readable UTF-8 text file") from exc


def is_row_file(source: str) -> bool:
    return source.lower().endswith((".jsonl", ".csv"))


def read_rows(source: str, flag: str = "--eval_data",
              fix: str = "a .jsonl file holds one JSON object per line") -> list[dict[str, Any]]:
    """The rows of a ``.jsonl`` file (one JSON object per line) or a ``.csv`` file with a header, as
    dicts. Raises InvalidRequest naming the line that is not an object, then ``fix``."""
    import csv
    import io

    from grove.errors import InvalidRequest

    # newline="": quoted CSV fields may hold line breaks; utf-8-sig: spreadsheets often start with a BOM
    f = io.StringIO(read_raw(source, flag, encoding="utf-8-sig", newline=""), newline="")
    if not source.lower().endswith(".jsonl"):
        return list(csv.DictReader(f))
    rows = []
    for number, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"{flag} {source}: line {number} is not JSON ({exc.msg}); {fix}") from exc
        if not isinstance(row, dict):
            raise InvalidRequest(f"{flag} {source}: line {number} is not a JSON object; {fix}")
        rows.append(row)
    return rows


def read_columns(source: str, flag: str = "--eval_data") -> dict[str, list[Any]]:
    """A table's columns: a Parquet file's, or a JSONL / CSV file's (named by its first row)."""
    if is_table(source):
        return read_table(source, flag)
    rows = read_rows(source, flag)
    return {k: [r.get(k) for r in rows] for k in (rows[0] if rows else {})}


# Column names a table's text and labels go by in hub datasets (imdb, ag_news: text; sst2: sentence).
TEXT_COLUMNS = ("text", "sentence", "content")
LABEL_COLUMNS = ("label", "labels")


def is_table(source: str) -> bool:
    """A Parquet file, or a glob of them (``<split>/*.parquet``)."""
    return source.lower().endswith(".parquet")


_PARQUET_COPY = "@refs/convert/parquet/"  # the hub's Parquet copy of a dataset (flows/olive_config.py reads it)
_SPLIT_LAYOUT = "the hub's Parquet copy of a dataset holds <subset>/<split>/NNNN.parquet"


def _is_remote(source: str) -> bool:
    return "://" in source and not source.startswith("file://")


def table_files(source: str, flag: str = "--eval_data") -> list[str]:
    """The files a table source names: itself, or, for a glob (``*``, ``?``, ``[``), the files it
    matches in name order: a hub split's Parquet copy is one file per shard
    (``<subset>/<split>/0000.parquet``, ``0001.parquet``...). Raises InvalidRequest naming ``flag``
    when a glob matches nothing or its folder cannot be listed."""
    import glob

    import fsspec

    from grove.errors import InvalidRequest

    if not glob.has_magic(source):
        return [source]
    try:
        if _is_remote(source):
            fs, pattern = fsspec.core.url_to_fs(source)
            files = [fs.unstrip_protocol(f) for f in fs.glob(pattern)]
        else:
            files = glob.glob(source.removeprefix("file://"))
    except Exception as exc:
        if not (_is_remote(source) or isinstance(exc, OSError)):
            raise
        raise _unreadable(source, flag, exc, "a folder of Parquet files", "check the folder") from exc
    if not files:
        fix = f"{_SPLIT_LAYOUT}: check the subset and split names" if _PARQUET_COPY in source else (
            "check the folder and the pattern")
        raise InvalidRequest(f"{flag} {source} matches no file; {fix}")
    return sorted(files)


def read_table(source: str, flag: str = "--eval_data") -> dict[str, list[Any]]:
    """A Parquet table's columns: one file (a path or an fsspec URI, e.g. a hub dataset's
    ``hf://datasets/<org>/<name>/<split>.parquet``), or the rows of every file a glob matches, in name
    order (a hub split's shards, ``.../<split>/*.parquet``). Raises InvalidRequest naming ``flag``."""
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    from grove.errors import InvalidRequest

    tables = []
    for file in table_files(source, flag):
        try:
            with fsspec.open(_local_copy(file) if _is_remote(file) else file, "rb") as f:
                tables.append(pq.read_table(f))
        except Exception as exc:
            if not (_is_remote(file) or isinstance(exc, (OSError, pa.ArrowException))):
                raise
            raise _unreadable(file, flag, exc, "a Parquet table", "pass a readable .parquet file") from exc
    try:
        return dict(pa.concat_tables(tables).to_pydict())
    except pa.ArrowInvalid as exc:  # shards whose columns differ
        raise InvalidRequest(f"{flag} {source}: its files do not have the same columns ({exc}); name one file, "
                             "or files with one schema") from exc


def table_label_names(source: str, columns: tuple[str, ...]) -> list[str] | None:
    """The class names of the first of ``columns`` that the Parquet table ``source`` has, where the
    table says them (None otherwise): a hub dataset's file carries its ``datasets`` features in the
    schema's metadata, a ClassLabel column's names in id order. Call after ``read_table`` succeeded."""
    import fsspec
    import pyarrow.parquet as pq

    first = table_files(source)[0]  # a glob's files share a schema (read_table checks)
    with fsspec.open(_local_copy(first) if _is_remote(first) else first, "rb") as f:
        schema = pq.read_schema(f)
    present = [c for c in columns if c in schema.names]
    return _class_names(schema.metadata or {}).get(present[0]) if present else None


def _class_names(metadata: dict[bytes, bytes]) -> dict[str, list[str]]:
    """ClassLabel names per column from the ``huggingface`` schema metadata that the ``datasets``
    library writes: a label column (sst2's ``label``) or a list of labels (conll2003's ``ner_tags``)."""
    try:
        features = json.loads(metadata.get(b"huggingface", b"{}")).get("info", {}).get("features", {})
    except (ValueError, AttributeError):
        return {}
    names: dict[str, list[str]] = {}
    for column, feature in features.items() if isinstance(features, dict) else ():
        inner = feature[0] if isinstance(feature, list) and feature else feature
        if isinstance(inner, dict) and "feature" in inner:  # Sequence / List of a ClassLabel
            inner = inner["feature"]
        if isinstance(inner, dict) and isinstance(inner.get("names"), list):
            names[column] = [str(n) for n in inner["names"]]
    return names


def pick_column(table: dict[str, list[Any]], names: tuple[str, ...], source: str, flag: str = "--eval_data") -> str:
    """The first of ``names`` that ``table`` has; else InvalidRequest listing the table's columns."""
    from grove.errors import InvalidRequest

    for name in names:
        if name in table:
            return name
    raise InvalidRequest(f"{flag} {source} has no column named {' or '.join(names)} (its columns: "
                         f"{', '.join(table) or 'none'}); {COLUMNS_HELP}")


def _unreadable(source: str, flag: str, exc: Exception, what: str, fix: str) -> Exception:
    from grove.errors import InvalidRequest

    if source.startswith("hf://") and isinstance(exc, FileNotFoundError):  # the hub answered: no such file
        fix = ("the hub has no such file: check the path, hf://datasets/<org>/<name>/<file>, or set HF_TOKEN "
               "if the dataset is private")
        if _PARQUET_COPY in source:
            fix = f"{_SPLIT_LAYOUT}: check the dataset, subset and split names, or set HF_TOKEN if it is private"
    elif source.startswith("hf://"):
        fix = "a hub dataset file needs the hub: offline, copy the file to this machine and pass its path"
    cause = str(exc) if isinstance(exc, (OSError, UnicodeDecodeError)) else f"{exc.__class__.__name__}: {exc}"
    return InvalidRequest(f"{flag} {source} cannot be read as {what} ({cause}); {fix}")


def _local_copy(source: str) -> str:
    """A remote text (s3://, hf://datasets/...) copied once into this machine's caches, keyed by the
    object's version (ETag, LFS sha256 or git blob id), so a run reads it over the network once, not
    at each of its checks and evaluations."""
    import fsspec

    from grove.store import cache_home, download_file, mark_used

    fs, path = fsspec.core.url_to_fs(source)
    info = fs.info(path)
    version = (info.get("ETag") or info.get("etag") or (info.get("lfs") or {}).get("sha256") or info.get("blob_id")
               or f"{info.get('size')}-{info.get('mtime') or info.get('LastModified')}")
    local = cache_home() / "texts" / hashlib.sha256(f"{source}\0{version}".encode()).hexdigest()[:32] / Path(path).name
    if not local.exists():
        download_file(fs, path, local)
    mark_used(local.parent)
    return str(local)


def text_sha256(source: str) -> str:
    """sha256 of what an evaluation reads from ``source``: its text, or a table's every column
    (a classifier's labels too)."""
    path = split_columns(source)[0]  # the columns named are in the recipe, as part of the source
    if is_table(path):
        return hashlib.sha256(json.dumps(read_table(path), sort_keys=True, default=str).encode()).hexdigest()
    return hashlib.sha256((read_text(path) if path == BUILTIN_TEXT else read_raw(path)).encode()).hexdigest()
