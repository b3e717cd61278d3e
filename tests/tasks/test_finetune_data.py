"""Fine-tuning data, without training: where rows come from, how a row becomes text, which tokens count
in the loss, and how samples become blocks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from grove.errors import InvalidRequest
from grove.tasks import _finetune_data as fd
from tests import tiny_models


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tok")
    tiny_models.tokenizer(folder)
    (folder / "chat_template.jinja").write_text(tiny_models.CHAT_TEMPLATE)
    return AutoTokenizer.from_pretrained(str(folder))


def test_data_names_resolve_as_olive_reads_them(tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "a"}\n')
    assert fd.data_files("json", "train", None, [str(rows)]) == [str(rows.resolve())]
    assert fd.data_files(str(rows), "train", None, []) == [str(rows.resolve())]
    assert fd.data_files(str(tmp_path), "train", None, []) == [str(rows.resolve())]  # a folder: its data files
    assert fd.data_files("microsoft/dolly-15k", "train", None, []) == [
        "hf://datasets/microsoft/dolly-15k@refs/convert/parquet/default/train/*.parquet"]
    assert fd.data_files("org/set", "test", "sub", []) == ["hf://datasets/org/set@refs/convert/parquet/sub/test/*.parquet"]
    assert fd.data_files("org/set", "train", None, ["data/a.jsonl"]) == ["hf://datasets/org/set/data/a.jsonl"]
    with pytest.raises(InvalidRequest, match="-d json reads the files --data_files names, and none is given"):
        fd.data_files("json", "train", None, [])
    with pytest.raises(InvalidRequest, match="not a file, a folder, a builder"):
        fd.data_files("dolly", "train", None, [])


def test_rows_are_read_from_every_format(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    want = [{"q": "one", "a": "1"}, {"q": "two", "a": "2"}]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in want))
    (tmp_path / "r.json").write_text(json.dumps({"data": want}))
    (tmp_path / "r.csv").write_text("q,a\none,1\ntwo,2\n")
    pq.write_table(pa.Table.from_pylist(want), str(tmp_path / "r.parquet"))
    for name in ("r.jsonl", "r.json", "r.csv", "r.parquet"):
        assert fd.read_rows([str(tmp_path / name)]) == want, name
    (tmp_path / "r.txt").write_text("first line\n\nsecond line\n")
    assert fd.read_rows([str(tmp_path / "r.txt")]) == [{"text": "first line"}, {"text": "second line"}]


def test_a_template_masks_the_prompt_and_trains_on_the_response(tokenizer) -> None:  # noqa: ANN001
    row = {"instruction": "Name a colour.", "response": "Blue is a colour."}
    (sample,) = fd.render([row], text_field=None, text_template="Q: {instruction}\nA: {response}",
                          train_on_responses=True)
    assert sample.text == "Q: Name a colour.\nA: Blue is a colour."
    assert sample.trained == ((len("Q: Name a colour.\nA: "), len(sample.text)),)
    blocks = fd.token_blocks([sample], tokenizer, seq_len=64, max_blocks=None)
    (ids,), (labels,) = blocks.input_ids, blocks.labels
    trained = [t for t, label in zip(ids, labels, strict=True) if label != fd.IGNORE]
    assert tokenizer.decode(trained[:-1]).strip() == "Blue is a colour."  # then the end-of-sequence token
    assert trained[-1] == tokenizer.eos_token_id


def test_a_chat_trains_on_the_assistant_turns_only(tokenizer) -> None:  # noqa: ANN001
    row = {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello back"},
                        {"role": "user", "content": "Bye now"}, {"role": "assistant", "content": "Goodbye"}]}
    (sample,) = fd.render([row], text_field=None, text_template=None, chat=tokenizer, train_on_responses=True)
    trained = "".join(sample.text[start:end] for start, end in sample.trained or ())
    assert "Hello back" in trained and "Goodbye" in trained
    assert "Hi there" not in trained and "Bye now" not in trained


def test_blocks_are_joined_cut_and_the_last_padded(tokenizer) -> None:  # noqa: ANN001
    samples = [fd.Sample("word " * 30) for _ in range(5)]
    blocks = fd.token_blocks(samples, tokenizer, seq_len=32, max_blocks=None)
    assert all(len(row) == 32 for row in blocks.input_ids)
    assert blocks.tokens == sum(map(sum, blocks.attention_mask))
    last = blocks.attention_mask[-1]
    assert 0 < sum(last) < 32 and blocks.labels[-1][sum(last):] == [fd.IGNORE] * (32 - sum(last))
    capped = fd.token_blocks(samples, tokenizer, seq_len=32, max_blocks=2)
    assert len(capped.input_ids) == 2 and capped.samples < 5, "rows past the blocks asked for are not read"


def test_a_missing_column_names_the_columns_the_data_has() -> None:
    rows = [{"instruction": "x", "response": "y"}]
    with pytest.raises(InvalidRequest, match=r"--text_template reads the column 'question', which the data does not "
                       r"have \(row 1\); its columns: instruction, response"):
        list(fd.render(rows, text_field=None, text_template="{question}"))
    with pytest.raises(InvalidRequest, match=r"--text_field: the data has no column 'body' \(row 1\)"):
        list(fd.render(rows, text_field="body", text_template=None))
    with pytest.raises(InvalidRequest, match="fields are named by column"):
        fd.template_fields("Q: {}")
