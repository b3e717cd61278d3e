"""What the encoder path reads and computes besides the graphs: labelled tables (Parquet, JSONL, CSV,
CoNLL) and their columns and class names, calibration text from tables, and the metrics (Spearman,
entity spans)."""


from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from grove.errors import InvalidRequest
from grove.tasks import _encoder_io as eio


def test_spearman_is_scipys() -> None:
    from scipy.stats import spearmanr

    from grove.tasks.evaluate_encoder import spearman

    rng = np.random.default_rng(1)
    a = rng.integers(0, 6, 200).astype(float)  # many ties, as STS scores have
    b = a + rng.normal(0, 2, 200)
    assert spearman(a, b) == pytest.approx(float(spearmanr(a, b).statistic), abs=1e-12)
    assert spearman(b, -b) == pytest.approx(-1.0)


def test_a_labelled_table_is_fingerprinted_by_its_labels_too(tmp_path: Path) -> None:
    """A relabelled Parquet table is a new recipe (its text alone is unchanged)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from grove.tasks.evaluate import fingerprint_text

    texts = ["a first row of text", "a second row of text"]
    pq.write_table(pa.table({"text": texts, "label": [0, 1]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": texts, "label": [1, 1]}), tmp_path / "b.parquet")
    assert fingerprint_text(str(tmp_path / "a.parquet")) != fingerprint_text(str(tmp_path / "b.parquet"))
    assert eio.read_labelled(str(tmp_path / "a.parquet")) == (texts, ["0", "1"])


def test_a_text_table_reads_as_its_text_column_as_parquet_jsonl_or_csv(tmp_path: Path) -> None:
    """Perplexity text and calibration paragraphs from a dataset's rows: a Parquet, JSONL or CSV
    table reads as its text column's rows, one paragraph each (not as the file's JSON or CSV
    syntax); the recipe's fingerprint covers the file's every column."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    from grove.errors import InvalidRequest
    from grove.tasks import _data_sources as data_io

    texts = [" ".join(p.split()) for p in eio.read_lines("builtin:GPL-3", 6)]
    texts[2] = 'a row with "quotes", a comma\nand a line break, longer than forty characters'
    pq.write_table(pa.table({"text": texts, "label": [0] * 6}), tmp_path / "t.parquet")
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t, "label": 0}) + "\n" for t in texts))
    with (tmp_path / "t.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("label", "text"), *((0, t) for t in texts)])
    for name in ("t.parquet", "t.jsonl", "t.csv"):
        assert data_io.read_text(str(tmp_path / name)) == "\n\n".join(texts), name
        assert eio.read_lines(str(tmp_path / name), 4) == [" ".join(t.split()) for t in texts[:4]], name
    before = data_io.text_sha256(str(tmp_path / "t.jsonl"))
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t, "label": 1}) + "\n" for t in texts))
    assert data_io.text_sha256(str(tmp_path / "t.jsonl")) != before
    (tmp_path / "no-text.jsonl").write_text('{"sentence1": "a", "sentence2": "b"}\n')
    with pytest.raises(InvalidRequest, match=r"no-text.jsonl has no column named text or sentence or content \(its "
                       r"columns: sentence1, sentence2\)"):
        data_io.read_text(str(tmp_path / "no-text.jsonl"))


def test_static_int8_calibrates_on_a_tables_sentence_pairs(tmp_path: Path) -> None:
    """A paraphrase / NLI table (GLUE MRPC's sentence1 + sentence2) calibrates on its pairs, as the
    model reads them, at most the limit asked for; a text table on its text rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from grove.errors import InvalidRequest

    first, second = ["He said so.", "It rained.", None, "Fine."], ["So he said.", "Rain fell.", "x", "Good."]
    pq.write_table(pa.table({"sentence1": first, "sentence2": second, "label": [1, 1, 0, 1]}), tmp_path / "p.parquet")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"premise": a, "hypothesis": b}) + "\n"
                                              for a, b in zip(first, second, strict=False) if a))
    expected = [("He said so.", "So he said."), ("It rained.", "Rain fell."), ("Fine.", "Good.")]
    assert eio.calibration_texts(str(tmp_path / "p.parquet"), 32) == expected  # the row without a pair skipped
    assert eio.calibration_texts(str(tmp_path / "p.jsonl"), 2) == expected[:2]
    texts = eio.read_lines("builtin:GPL-3", 3)
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert eio.calibration_texts(str(tmp_path / "t.jsonl"), 3) == texts
    pq.write_table(pa.table({"sentence1": [None], "sentence2": ["b"]}), tmp_path / "empty.parquet")
    with pytest.raises(InvalidRequest, match="has no row with both sentence1 and sentence2"):
        eio.calibration_texts(str(tmp_path / "empty.parquet"), 4)


@pytest.mark.parametrize(("reader", "name", "content", "expected"), [
    ("read_labelled", "wrong-header.csv", "txt,lab\nhello,0\n", "row 1 has no text or no label"),
    ("read_labelled", "empty.csv", "text,label\n", "no rows"),
    ("read_labelled", "missing-label.csv", "text,label\nfine,1\nno label here,\n", "row 2 has no text or no label"),
    ("read_labelled", "broken.jsonl", '{"text": "a", "label": 1}\nnot json\n', "line 2 is not JSON"),
    ("read_labelled_tokens", "short.jsonl", '{"tokens": ["a", "b"], "ner_tags": ["O"]}\n',
     "sentence 1 has 2 words and 1 tags"),
    ("read_labelled_tokens", "nolist.jsonl", '{"text": "a b", "label": "O"}\n',
     "sentence 1 has no list of words and list of tags"),
    ("read_labelled_tokens", "ner.csv", "tokens,ner_tags\na,O\n", "a CSV or JSON file holds no list of words per row"),
    ("read_labelled_tokens", "notag.conll", "Paris B-LOC\nis\n", "line 2 has a word and no tag"),
    ("read_labelled_tokens", "empty.conll", "-DOCSTART- O\n\n\n", "no sentences"),
])
def test_malformed_labelled_data_is_one_clear_error(reader: str, name: str, content: str, expected: str,
                                                    tmp_path: Path) -> None:
    """Text classifiers' rows and token classifiers' sentences: one error naming the problem and the formats."""
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InvalidRequest, match=expected) as exc:
        getattr(eio, reader)(str(path))
    formats = {"read_labelled": "text,label header", "read_labelled_tokens": "a token classifier's labelled data is a"}
    assert formats[reader] in str(exc.value)


def test_a_table_without_its_columns_or_not_a_table_is_one_clear_error(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from grove.errors import InvalidRequest

    pq.write_table(pa.table({"review": ["good"], "stars": [5]}), tmp_path / "reviews.parquet")
    with pytest.raises(InvalidRequest, match="has no column named text or sentence or content \\(its columns: "
                       "review, stars\\); name a table's columns after the source, "
                       "SOURCE#text=<column>,label=<column>"):
        eio.read_labelled(str(tmp_path / "reviews.parquet"))
    (tmp_path / "fake.parquet").write_text("text,label\nhello,1\n")
    with pytest.raises(InvalidRequest, match="fake.parquet cannot be read as a Parquet table"):
        eio.read_labelled(str(tmp_path / "fake.parquet"))
    shards = tmp_path / "split"  # a split in shards (a hub dataset's Parquet copy): one file's fault is named
    shards.mkdir()
    pq.write_table(pa.table({"text": ["good"], "label": [1]}), shards / "0000.parquet")
    pq.write_table(pa.table({"review": ["bad"], "stars": [1]}), shards / "0001.parquet")
    with pytest.raises(InvalidRequest, match=r"split/\*.parquet: its files do not have the same columns"):
        eio.read_labelled(str(shards / "*.parquet"))
    (shards / "0001.parquet").write_text("not parquet")
    with pytest.raises(InvalidRequest, match="0001.parquet cannot be read as a Parquet table"):
        eio.read_labelled(str(shards / "*.parquet"))
    with pytest.raises(InvalidRequest, match=r"test-\*.parquet matches no file; check the folder and the pattern"):
        eio.read_labelled(str(shards / "test-*.parquet"))


def test_a_tables_columns_are_named_after_the_source(tmp_path: Path) -> None:
    """``#text=<column>[+<column>],label=<column>`` (what an Olive config's input_cols / label_col
    become) reads columns of any name, in CSV, JSON lines and Parquet, for every reader; a named
    column the table lacks is an error listing its columns, never a silent fallback to another."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from grove.tasks import _data_sources as data_io

    reviews = {"review": ["A quiet film about two brothers who run a farm together.", "Dull and long."],
               "stars": ["5", "1"], "label": ["decoy", "decoy"]}  # a label column the suffix must not pick
    (tmp_path / "reviews.csv").write_text("review,stars,label\n" + "".join(
        f'"{r}",{s},{d}\n' for r, s, d in zip(*reviews.values(), strict=True)))
    (tmp_path / "reviews.jsonl").write_text("".join(json.dumps(dict(zip(reviews, row, strict=True))) + "\n"
                                                    for row in zip(*reviews.values(), strict=True)))
    pq.write_table(pa.table(reviews), tmp_path / "reviews.parquet")
    for suffix in ("csv", "jsonl", "parquet"):
        source = f"{tmp_path / 'reviews'}.{suffix}#text=review,label=stars"
        assert eio.read_labelled(source) == (reviews["review"], ["5", "1"]), suffix
        with pytest.raises(InvalidRequest, match=r"has no column named rating \(its columns: review, stars, label\)"):
            eio.read_labelled(f"{tmp_path / 'reviews'}.{suffix}#text=review,label=rating")
        assert data_io.text_sha256(source) == data_io.text_sha256(f"{tmp_path / 'reviews'}.{suffix}")

    nli = {"premise": ["The committee met on Tuesday to discuss the new budget for the library.",
                       "Two children are playing football in a park near the old railway station."],
           "hypothesis": ["The library's budget was discussed.", "Nobody is outside."], "gold": [0, 2]}
    pq.write_table(pa.table(nli), tmp_path / "nli.parquet")
    pairs = list(zip(nli["premise"], nli["hypothesis"], strict=True))
    assert eio.read_labelled(f"{tmp_path / 'nli.parquet'}#text=premise+hypothesis,label=gold") == (pairs, ["0", "2"])
    assert eio.read_scored_pairs(f"{tmp_path / 'nli.parquet'}#text=premise+hypothesis,label=gold") == (pairs, [0, 2])
    # static int8 calibration: one named column (its rows as paragraphs), or a named pair
    assert eio.calibration_texts(f"{tmp_path / 'nli.parquet'}#text=premise", 8, "--calibration_data") == nli["premise"]
    assert eio.calibration_texts(f"{tmp_path / 'nli.parquet'}#text=premise+hypothesis", 8) == pairs
    with pytest.raises(InvalidRequest, match="has no column named hypo"):
        eio.calibration_texts(f"{tmp_path / 'nli.parquet'}#text=premise+hypo", 8)
    # a decoder's perplexity text: the named column's rows joined by blank lines
    assert data_io.read_text(f"{tmp_path / 'nli.parquet'}#text=hypothesis,label=gold") == "\n\n".join(nli["hypothesis"])
    with pytest.raises(InvalidRequest, match="read from one column of a .parquet, .jsonl or .csv table"):
        data_io.read_text(f"{tmp_path / 'notes.txt'}#text=body")
    # a token classifier's words and tags
    (tmp_path / "ner.jsonl").write_text(json.dumps({"w": ["Ada", "codes"], "t": ["B-PER", "O"], "tags": ["x", "y"]}))
    assert eio.read_labelled_tokens(f"{tmp_path / 'ner.jsonl'}#text=w,label=t") == ([["Ada", "codes"]],
                                                                                   [["B-PER", "O"]])
    with pytest.raises(InvalidRequest, match="has no column named words_"):
        eio.read_labelled_tokens(f"{tmp_path / 'ner.jsonl'}#text=words_,label=t")

    assert data_io.split_columns("data/run#3/dev.csv") == ("data/run#3/dev.csv", data_io.Columns())  # no suffix: a path
    with pytest.raises(InvalidRequest, match="text= names 3 columns; Grove reads one text or a sentence pair"):
        data_io.split_columns("a.csv#text=x+y+z")
    with pytest.raises(InvalidRequest, match="label= is given twice"):
        data_io.split_columns("a.csv#label=x,label=y")


def test_a_spreadsheet_csv_with_a_byte_order_mark_reads(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes("text,label\r\n\"one, two\",1\r\nthree,0\r\n".encode("utf-8-sig"))
    assert eio.read_labelled(str(path)) == (["one, two", "three"], ["1", "0"])


def test_labels_are_the_model_classes_by_id_or_name() -> None:
    from grove.errors import InvalidRequest

    id2label = {"0": "negative", "1": "neutral", "2": "positive"}
    assert eio.label_ids(["positive", "0", "neutral", "2"], id2label, "f.csv") == [2, 0, 1, 2]
    with pytest.raises(InvalidRequest, match="label\\(s\\) 3, NEGATIVE are not among this model's 3 classes") as exc:
        eio.label_ids(["negative", "3", "NEGATIVE"], id2label, "f.csv")
    assert "ids 0-2 or names negative, neutral, positive" in str(exc.value)


def test_table_class_names_match_the_model_classes_by_name(caplog: pytest.LogCaptureFixture) -> None:
    """A hub dataset numbers its classes in its own order (its ClassLabel names, in the Parquet
    schema's metadata); a model may number the same classes differently: matched by name."""
    import logging

    id2label = {"0": "O", "1": "B-PER", "2": "I-PER"}
    assert eio.label_ids(["0", "1", "2"], id2label, "t.parquet", names=["o", "I-PER", "B-PER"]) == [0, 2, 1]
    # Names the model does not have: the ids are taken as the model's, and the log says so.
    with caplog.at_level(logging.WARNING, logger="test-names"):
        ids = eio.label_ids(["0", "1"], id2label, "t.parquet", names=["O", "B-ORG"],
                            log=logging.getLogger("test-names"))
    assert ids == [0, 1]
    assert "names its classes B-ORG, O, and this model's are O, B-PER, I-PER" in caplog.text


def test_entity_spans_read_iob_as_conlleval_does() -> None:
    from grove.tasks.evaluate_encoder import entity_f1, entity_spans

    assert entity_spans(["B-PER", "I-PER", "O", "B-LOC"]) == {("PER", 0, 2), ("LOC", 3, 4)}
    assert entity_spans(["I-PER", "I-PER", "I-LOC"]) == {("PER", 0, 2), ("LOC", 2, 3)}  # IOB1: I- after O/other starts
    assert entity_spans(["B-PER", "B-PER"]) == {("PER", 0, 1), ("PER", 1, 2)}
    assert entity_spans(["S-ORG", "B-MISC", "E-MISC", "O"]) == {("ORG", 0, 1), ("MISC", 1, 3)}  # IOBES
    # one entity right and one cut short: precision 1/2, recall 1/2
    assert entity_f1([["B-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "O", "O", "B-LOC"]]) == pytest.approx(0.5)
    # across sentences: one right, two invented, one missed: precision 1/3, recall 1/2
    assert entity_f1([["B-PER", "O"], ["B-ORG"]], [["B-PER", "B-LOC"], ["B-MISC"]]) == pytest.approx(0.4)
    assert entity_f1([["O"]], [["O"]]) is None
