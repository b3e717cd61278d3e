"""Helpers the encoder nodes share: the artifact's encoder description, tokenising fixed
sentences into the graph's inputs, onnxruntime sessions, and the comparisons parity and
evaluation both make. Plain functions; heavy imports inside them."""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grove.tasks.architectures import encoder_spec

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    import numpy as np
    import onnxruntime as ort

    from grove.tasks._data_sources import Columns

__all__ = ["ENCODER_JSON", "PARITY_TEXTS", "EncoderInfo", "calibration_texts", "cosine_rows", "encode", "encoder_info",
           "label_ids", "max_tokens", "pair_columns", "primary_output", "read_labelled", "read_labelled_tokens",
           "read_lines", "read_scored_pairs", "run", "session", "tokenizer"]

# A sentence pair's columns, as hub datasets name them: MRPC / RTE / WNLI / STS-B, MNLI / SNLI,
# QNLI, QQP, SICK, and transformers' own (text, text_pair).
PAIR_COLUMNS = (("sentence1", "sentence2"), ("premise", "hypothesis"), ("question", "sentence"),
                ("question1", "question2"), ("sentence_A", "sentence_B"), ("text", "text_pair"))
# An embedding model's labelled pairs carry a similarity score: GLUE's stsb (label, 0-5),
# sentence-transformers/stsb (score, 0-1), SICK (relatedness_score).
SCORE_COLUMNS = ("label", "score", "similarity_score", "relatedness_score")
TOKEN_COLUMNS = ("tokens", "words")
TAG_COLUMNS = ("ner_tags", "tags", "labels", "label")

ENCODER_JSON = "grove_encoder.json"
# Fixed sentences: short and long, punctuation, digits, a code fragment; the same every run so
# that parity numbers are comparable across runs and machines.
PARITY_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Machine learning models can be compressed with quantization without losing much accuracy.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "def add(a, b):\n    return a + b",
    "I absolutely loved this movie; the acting was superb and the plot kept me guessing.",
    "The service was slow and the food arrived cold. I will not come back.",
    "In 2024, 3.5 million people visited the museum, a record since it opened in 1889.",
    "Grove optimizes models as a cached DAG of nodes on Prefect.",
)


@dataclass(frozen=True)
class EncoderInfo:
    """What capture-encoder recorded in ``grove_encoder.json``."""

    task: str
    model_type: str
    inputs: list[str]
    outputs: list[str]
    pooling: str | None
    num_heads: int
    hidden_size: int


def encoder_info(folder: Path) -> EncoderInfo:
    raw = json.loads((folder / ENCODER_JSON).read_text())
    return EncoderInfo(**{k: raw[k] for k in EncoderInfo.__dataclass_fields__})


def primary_output(info: EncoderInfo) -> str:
    """The output parity and evaluation compare: the sentence embedding if the graph has one."""
    return "sentence_embedding" if "sentence_embedding" in info.outputs else info.outputs[0]


def tokenizer(folder: Path, **options: object):  # noqa: ANN201 - a transformers tokenizer (typed loosely upstream)
    """The folder's tokenizer, loaded once per process (labelled data is tokenised batch by batch:
    a 25,000-row split is ~800 batches); a folder whose files change is loaded again."""
    stamp = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in sorted(Path(folder).glob("*"))
                  if f.is_file() and not f.name.endswith((".onnx", ".data", ".safetensors", ".bin")))
    return _load_tokenizer(str(folder), stamp, tuple(sorted(options.items())))


@functools.lru_cache(maxsize=8)
def _load_tokenizer(folder: str, stamp: tuple[object, ...], options: tuple[tuple[str, object], ...]):  # noqa: ANN202, ARG001
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, **dict(options))


def encode(folder: Path, texts: Sequence[str | tuple[str, str]], inputs: list[str], *,
           max_length: int = 128, pad_to: int | None = None) -> dict[str, np.ndarray]:
    """Tokenise ``texts`` (strings, or sentence pairs) with the artifact's tokenizer into the graph's
    int64 inputs."""
    import numpy as np

    tok = tokenizer(folder)
    padding: bool | str = "max_length" if pad_to else True
    enc = tok(list(texts), padding=padding, truncation=True, max_length=pad_to or max_length, return_tensors="np")
    return {name: np.asarray(enc[name], dtype=np.int64) if name in enc else
            np.zeros_like(enc["input_ids"], dtype=np.int64) for name in inputs}


def session(model_path: Path, *, threads: int = 2, provider: str = "cpu") -> ort.InferenceSession:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1  # one request at a time: inter-op threads only add contention
    providers = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                 "dml": ["DmlExecutionProvider", "CPUExecutionProvider"]}[provider]
    return ort.InferenceSession(str(model_path), options, providers=providers)


def run(sess: ort.InferenceSession, feeds: dict[str, np.ndarray], output: str) -> np.ndarray:
    import numpy as np

    names = {i.name for i in sess.get_inputs()}
    result = sess.run([output], {k: v for k, v in feeds.items() if k in names})[0]
    return np.asarray(result, dtype=np.float32)


def cosine_rows(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Cosine per vector over the last axis (per sentence, or per real token when ``mask``)."""
    import numpy as np

    a2, b2 = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    cos = (a2 * b2).sum(-1) / (np.linalg.norm(a2, axis=-1) * np.linalg.norm(b2, axis=-1) + 1e-12)
    return cos[mask.reshape(-1).astype(bool)] if mask is not None and a.ndim == 3 else cos


def read_lines(source: str, limit: int, flag: str = "--calibration_data") -> list[str]:
    """The paragraphs of a text file longer than 40 characters, at most ``limit`` (``builtin:GPL-3`` =
    the text shipped with Grove). Raises InvalidRequest naming ``flag`` if it cannot be read or has none."""
    from grove.errors import InvalidRequest
    from grove.tasks._data_sources import read_text

    text = read_text(source, flag)
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n")]
    if not (kept := [p for p in paragraphs if len(p) > 40][:limit]):
        raise InvalidRequest(f"{flag} {source} holds no paragraph longer than 40 characters (paragraphs are "
                             "separated by blank lines); pass a text file with real sentences")
    return kept


def pair_columns(columns: object) -> tuple[str, str] | None:
    """The sentence pair's columns (``PAIR_COLUMNS``) that ``columns`` (names, or a row or table keyed
    by them) holds, if any."""
    return next((p for p in PAIR_COLUMNS if p[0] in columns and p[1] in columns), None)  # type: ignore[operator]


def calibration_texts(source: str, limit: int, flag: str = "--calibration_data") -> list[str | tuple[str, str]]:
    """What static int8 calibrates on: a table's sentence pairs (``PAIR_COLUMNS``, as a paraphrase or
    NLI model reads them: GLUE MRPC's sentence1 + sentence2) when it has them, else the text's
    paragraphs (``read_lines``); at most ``limit``. Raises InvalidRequest naming ``flag``."""
    from grove.errors import InvalidRequest
    from grove.tasks._data_sources import is_row_file, is_table, read_columns, split_columns

    path, columns = split_columns(source, flag)
    if (is_table(path) or is_row_file(path)) and len(columns.text) != 1:  # one named column: read_lines reads it
        table = read_columns(path, flag)
        if pair := _named_pair(columns, table, source, flag) or pair_columns(table):
            if not (pairs := [(str(a), str(b)) for a, b in zip(table[pair[0]], table[pair[1]], strict=True)
                              if a is not None and b is not None][:limit]):
                raise InvalidRequest(f"{flag} {source} has no row with both {pair[0]} and {pair[1]}")
            return pairs  # type: ignore[return-value]
    return read_lines(source, limit, flag)  # type: ignore[return-value]


def _named_pair(columns: Columns, table: Mapping[str, object], source: str,
                flag: str = "--eval_data") -> tuple[str, str] | None:
    """The sentence pair ``#text=<first>+<second>`` names, if it does; InvalidRequest if ``table`` (a
    table's columns, or a row) lacks either."""
    from grove.tasks._data_sources import pick_column

    if len(columns.text) != 2:
        return None
    first, second = (pick_column(table, (name,), source, flag) for name in columns.text)  # type: ignore[arg-type]
    return first, second


def read_labelled(source: str, label_columns: tuple[str, ...] | None = None) -> tuple[list[str | tuple[str, str]],
                                                                                   list[str]]:
    """The texts and labels of a labelled file: CSV with a header, JSONL objects, or a Parquet table
    (a hub dataset's file), each with a text (or sentence) and a label column, or a sentence pair
    (GLUE's and NLI datasets' columns, ``PAIR_COLUMNS``: the text is then a pair, which the tokenizer
    joins as the model was trained); ``label_columns``: where the label is (default: label, labels);
    a path or an fsspec URI. ``#text=<column>[+<column>],label=<column>`` after it names the columns
    instead. Raises InvalidRequest naming what is wrong."""
    from grove.errors import InvalidRequest
    from grove.tasks._data_sources import (
        LABEL_COLUMNS,
        TEXT_COLUMNS,
        is_table,
        pick_column,
        read_rows,
        read_table,
        split_columns,
    )

    path, columns = split_columns(source)
    label_columns = (columns.label,) if columns.label else label_columns or LABEL_COLUMNS
    text_columns = columns.text if len(columns.text) == 1 else TEXT_COLUMNS

    formats = ("labelled data is a CSV file with a text,label header, a .jsonl file of {\"text\": ..., \"label\": "
               "...} lines, or a .parquet table with text (or sentence) and label columns; a sentence pair's columns "
               "are " + ", ".join(" + ".join(pair) for pair in PAIR_COLUMNS))

    def bad(problem: str) -> InvalidRequest:
        return InvalidRequest(f"--eval_data {source}: {problem}; {formats}")

    if is_table(path):
        table = read_table(path)
        if pair := _named_pair(columns, table, source) or (None if columns.text else pair_columns(table)):
            texts: list[object] = [None if a is None or b is None else (a, b)
                                   for a, b in zip(table[pair[0]], table[pair[1]], strict=True)]
        else:
            texts = table[pick_column(table, text_columns, source)]
        label = pick_column(table, label_columns, source)
        rows = [{"text": t, "label": y} for t, y in zip(texts, table[label], strict=True)]
    else:
        rows = read_rows(path, fix=formats)  # JSON lines, or CSV whatever the suffix
        first = rows[0] if rows else {}
        if pair := _named_pair(columns, first, source) or (None if columns.text else pair_columns(first)):
            rows = [{**r, "text": None if r.get(pair[0]) is None or r.get(pair[1]) is None else
                     (r[pair[0]], r[pair[1]])} for r in rows]
        else:
            text = pick_column(first, text_columns, source) if columns.text and rows else next(
                (c for c in text_columns if c in first), "text")
            rows = [{**r, "text": r.get(text)} for r in rows]
        label = pick_column(first, label_columns, source) if columns.label and rows else next(
            (c for c in label_columns if c in first), "label")
        rows = [{**r, "label": r.get(label)} for r in rows]
    if not rows:
        raise bad("no rows")
    for number, row in enumerate(rows, 1):
        if row.get("text") is None or row.get("label") in (None, ""):
            raise bad(f"row {number} has no text or no label")
    return ([(str(r["text"][0]), str(r["text"][1])) if isinstance(r["text"], tuple) else str(r["text"]) for r in rows],
            [str(r["label"]) for r in rows])


def read_scored_pairs(source: str) -> tuple[list[tuple[str, str]], list[float]]:
    """An embedding model's labelled data: sentence pairs and their similarity scores (STS-B's
    sentence1, sentence2, label; sentence-transformers/stsb's score; SICK's relatedness_score), from
    CSV, JSONL or Parquet. Raises InvalidRequest naming what is wrong."""
    from grove.errors import InvalidRequest

    pairs, raw = read_labelled(source, SCORE_COLUMNS)
    what = ("an embedding model's labelled data is sentence pairs with a similarity score (sentence1, sentence2 "
            "and a label or score column, as STS-B)")
    if not all(isinstance(p, tuple) for p in pairs):
        raise InvalidRequest(f"--eval_data {source}: {what}; these rows have one text each")
    scores = []
    for number, x in enumerate(raw, 1):
        try:
            scores.append(float(x))
        except ValueError:
            raise InvalidRequest(f"--eval_data {source}: {what}; row {number}'s score {x!r} is not a number") from None
    return pairs, scores  # type: ignore[return-value]


def read_labelled_tokens(source: str) -> tuple[list[list[str]], list[list[str]]]:
    """The words and their tags, per sentence, of a token classifier's labelled file: JSONL objects
    with a ``tokens`` (or ``words``) list and a ``ner_tags`` (``tags``, ``labels``) list, a Parquet
    table with such list columns (a hub dataset's layout: conll2003, wikiann), or CoNLL text (a word
    and its tag per line, the tag in the last column, a blank line between sentences, ``-DOCSTART-``
    lines skipped). A path or an fsspec URI. Raises InvalidRequest naming what is wrong."""
    from grove.errors import InvalidRequest
    from grove.tasks._data_sources import is_table, pick_column, read_raw, read_rows, read_table, split_columns

    formats = ("a token classifier's labelled data is a .jsonl file of {\"tokens\": [...], \"ner_tags\": [...]} "
               "lines, a .parquet table with tokens and ner_tags list columns (a hub dataset's layout, e.g. "
               "conll2003), or CoNLL text: a word and its tag per line, a blank line between sentences")

    def bad(problem: str) -> InvalidRequest:
        return InvalidRequest(f"--eval_data {source}: {problem}; {formats}")

    path, columns = split_columns(source)
    if len(columns.text) > 1:
        raise bad(f"text= names {len(columns.text)} columns; a token classifier reads one, its words")
    names = (columns.text or TOKEN_COLUMNS, (columns.label,) if columns.label else TAG_COLUMNS)
    rows: list[tuple[Any, Any]] = []  # checked below: a list of words and a list of tags
    if is_table(path):
        table = read_table(path)
        words, tags = (pick_column(table, n, source) for n in names)
        rows = list(zip(table[words], table[tags], strict=True))
    elif path.lower().endswith((".csv", ".json")):
        raise bad("a CSV or JSON file holds no list of words per row")
    elif path.lower().endswith(".jsonl"):
        objects = read_rows(path, fix=formats)
        if columns.text or columns.label:  # named: the first row must have them (the others: checked below)
            for n in names:
                pick_column(objects[0] if objects else {}, n, source)
        rows = [(next((obj[k] for k in names[0] if k in obj), None), next((obj[k] for k in names[1] if k in obj), None))
                for obj in objects]
    elif columns.text or columns.label:
        raise bad("CoNLL text has no columns to name; leave #text= and label= out")
    else:
        sentence: tuple[list[str], list[str]] = ([], [])
        for number, line in enumerate(read_raw(path).splitlines() + [""], 1):
            parts = line.split()
            if not parts:
                if sentence[0]:
                    rows.append(sentence)
                sentence = ([], [])
            elif parts[0] != "-DOCSTART-":
                if len(parts) < 2:
                    raise bad(f"line {number} has a word and no tag")
                sentence[0].append(parts[0])
                sentence[1].append(parts[-1])
    if not rows:
        raise bad("no sentences")
    for number, (words, tags) in enumerate(rows, 1):
        if not isinstance(words, list) or not isinstance(tags, list) or not words:
            raise bad(f"sentence {number} has no list of words and list of tags")
        if len(words) != len(tags):
            raise bad(f"sentence {number} has {len(words)} words and {len(tags)} tags")
    return ([[str(w) for w in words] for words, _ in rows],
            [[str(t) for t in tags] for _, tags in rows])


def max_tokens(folder: Path, tok: object) -> int:
    """The most tokens one row can have: the tokenizer ``tok``'s limit, the position table's
    (RoBERTa's and MPNet's positions start after the padding id) and sentence-transformers' max_seq_length,
    512 at most."""
    config = json.loads((folder / "config.json").read_text())
    positions = int(config.get("max_position_embeddings") or 512)
    if (spec := encoder_spec(config.get("model_type"))) is not None and spec.positions_after_padding:
        positions -= int(config.get("pad_token_id") or 1) + 1
    if (st := folder / "sentence_bert_config.json").exists():  # sentence-transformers cuts here (MiniLM: 256)
        positions = min(positions, int(json.loads(st.read_text()).get("max_seq_length") or positions))
    return min(512, positions, int(tok.model_max_length))  # type: ignore[attr-defined]


def label_ids(labels: list[str], id2label: dict[str, str], source: str, names: list[str] | None = None,
              log: logging.Logger | logging.LoggerAdapter | None = None) -> list[int]:
    """Each label as the model's class id: an id2label name, or an id in range. Raises InvalidRequest
    listing the labels the model does not have. ``names``: the table's own class names in id order
    (a hub dataset's ClassLabel): when each one used is also a class of the model (case aside), the
    labels are matched by name, since a dataset and a model may number the same classes differently
    (conll2003's B-PER is 1, a fine-tuned model's may be 3); otherwise its ids are taken as the
    model's, and ``log`` says so."""
    from grove.errors import InvalidRequest

    if names and all(x.isdigit() and int(x) < len(names) for x in set(labels)):
        model_names = {str(n).lower(): str(n) for n in id2label.values()}
        used = sorted({names[int(x)] for x in labels})
        if all(n.lower() in model_names for n in used):
            labels = [model_names[names[int(x)].lower()] for x in labels]
        elif log is not None:
            log.warning("--eval_data %s names its classes %s, and this model's are %s: the table's ids are taken "
                        "as the model's class ids", source, ", ".join(used[:8]),
                        ", ".join(str(n) for n in list(id2label.values())[:8]))
    by_name = {str(name): int(i) for i, name in id2label.items()}
    known = {str(i) for i in range(len(id2label))}
    unknown = sorted({x for x in labels if x not in by_name and x not in known})
    if unknown:
        raise InvalidRequest(f"--eval_data {source}: label(s) {', '.join(unknown[:5])} are not among this model's "
                             f"{len(id2label)} classes: use their ids 0-{len(id2label) - 1} or names "
                             f"{', '.join(list(by_name)[:10])}")
    return [by_name[x] if x in by_name else int(x) for x in labels]
