"""Model sources resolve to digests that pin exact bytes; bad sources fail with the fix."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from grove.errors import ModelSourceError, UnsupportedArchitecture
from grove.tasks import _sources
from grove.tasks.architectures import arch_spec
from grove.tasks.download_model import DownloadConfig, _download


def test_local_folder_digest_follows_content(tiny_dir, tmp_path: Path) -> None:  # noqa: ANN001
    folder = shutil.copytree(tiny_dir("llama"), tmp_path / "m")
    first = _sources.resolve(str(folder))
    assert first.kind == "local" and first.model_type == "llama"
    assert _sources.resolve(str(folder)).digest == first.digest

    config = folder / "config.json"
    config.write_text(config.read_text().replace('"rms_norm_eps"', '"rms_norm_eps" ', 1))
    assert _sources.resolve(str(folder)).digest != first.digest


def _fake_hub_cache(model: Path, repo: str, sha: str) -> None:
    # The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<sha>/...}
    root = Path(os.environ["HF_HOME"]) / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(model, root / "snapshots" / sha)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(sha)


def test_hub_id_resolves_from_local_cache_when_offline(tiny_dir, tmp_path: Path) -> None:  # noqa: ANN001
    sha = "0123456789abcdef0123456789abcdef01234567"
    _fake_hub_cache(tiny_dir("qwen2"), "grove-test/tiny-qwen2", sha)

    source = _sources.resolve("grove-test/tiny-qwen2")
    assert (source.kind, source.digest, source.model_type) == ("hub", sha, "qwen2")
    out = tmp_path / "out"
    out.mkdir()
    _download(source, DownloadConfig(), out)
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()


def test_a_cached_hub_repo_keeps_its_subfolders(tmp_path: Path) -> None:
    """sentence-transformers repos keep their pooling in 1_Pooling/config.json. Served from the HF
    cache, only the snapshot's top level was listed: the pooling was dropped, and the encoder came
    out as raw hidden states instead of the library's embedding, silently."""
    from grove.tasks.capture_encoder import sentence_transformers_pipeline
    from tests.tiny_models import MINILM

    sha = "fedcba9876543210fedcba9876543210fedcba98"
    _fake_hub_cache(Path(_sources.resolve(MINILM).location), "sentence-transformers/all-MiniLM-L6-v2", sha)

    source = _sources.resolve("sentence-transformers/all-MiniLM-L6-v2")
    assert "1_Pooling/config.json" in source.files and "modules.json" in source.files
    out = tmp_path / "out"
    out.mkdir()
    _download(source, DownloadConfig(), out)
    assert sentence_transformers_pipeline(out) == ("mean", True)


@pytest.mark.parametrize(("kept", "missing"), [
    (["config.json", "tokenizer.json"], "holds no weights (*.safetensors); "),
    (["config.json", "model.safetensors"], "holds no tokenizer (tokenizer.json, tokenizer.model or vocab.txt); "),
])
def test_a_model_missing_its_weights_or_tokenizer_is_refused_at_resolve(kept: list[str], missing: str,
                                                                        tiny_dir, tmp_path: Path) -> None:  # noqa: ANN001
    """Before, a hub cache holding only config.json got as far as the builder, which failed on the
    tokenizer with a many-line transformers message naming neither the cache nor the fix."""
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in kept:
        shutil.copy2(tiny_dir("llama") / name, partial / name)
    with pytest.raises(ModelSourceError, match=re.escape(f"'{partial}' {missing}pass a complete model folder")):
        _sources.resolve(str(partial))

    sha = "89abcdef0123456789abcdef0123456789abcdef"
    _fake_hub_cache(partial, f"grove-test/partial-{len(kept[1])}", sha)
    with pytest.raises(ModelSourceError, match=re.escape(missing) + r"it holds only part of the model: .*"
                       r"huggingface-cli download grove-test/partial"):
        _sources.resolve(f"grove-test/partial-{len(kept[1])}")


def _bin_weights(model: Path, folder: Path) -> Path:
    """``model`` with its weights as pytorch_model.bin instead of model.safetensors (older hub repos)."""
    import torch
    from safetensors.torch import load_file

    shutil.copytree(model, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(model / "model.safetensors"), folder / "pytorch_model.bin")
    return folder


def _sharded(model: Path, folder: Path) -> Path:
    """``model`` with its weights in two safetensors shards and an index (as large models are), plus
    a consolidated.safetensors that the index does not map (as Mistral's repos carry)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = load_file(model / "model.safetensors")
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:]), 1):
        save_file({n: tensors[n] for n in part}, folder / f"model-0000{i}-of-00002.safetensors",
                  metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, f"model-0000{i}-of-00002.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy2(model / "model.safetensors", folder / "consolidated.safetensors")
    return folder


def test_a_sharded_folder_is_read_through_its_index(tiny_dir, tmp_path: Path) -> None:  # noqa: ANN001
    folder = _sharded(tiny_dir("llama"), tmp_path / "sharded")
    files = _sources.resolve(str(folder)).files
    assert "model-00001-of-00002.safetensors" in files and "consolidated.safetensors" not in files

    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelSourceError, match="maps weights to model-00002-of-00002.safetensors, which the model "
                       "folder lacks; it is incomplete"):
        _sources.resolve(str(folder))
    (folder / "model.safetensors.index.json").write_text("{")
    with pytest.raises(ModelSourceError, match="model.safetensors.index.json is not a safetensors index"):
        _sources.resolve(str(folder))


def test_an_online_hub_repo_is_pinned_to_its_commit_and_fetches_its_weights_once(
        tiny_dir, tmp_path: Path, store: str) -> None:  # noqa: ANN001
    """The tutorial's step 1 online: `grove auto-opt -m <hub id>` with the real huggingface_hub client
    against a hub on loopback. Before, a repo carrying pytorch_model.bin (alone, or beside
    safetensors as many do) failed in download-model with FileNotFoundError: resolve listed the .bin,
    the snapshot's patterns skipped it; and every *.safetensors was fetched, a consolidated copy too."""
    from tests.conftest import grove_cli
    from tests.hub_server import HubRepo, serve_hub

    both = _sharded(tiny_dir("llama"), tmp_path / "both")
    shutil.copy2(_bin_weights(tiny_dir("llama"), tmp_path / "bin") / "pytorch_model.bin", both)
    (both / "README.md").write_text("not needed by Grove")
    repos = {"grove-test/both": HubRepo(both, "1" * 40), "grove-test/bin-only": HubRepo(tmp_path / "bin", "2" * 40)}
    with serve_hub(repos) as (endpoint, requests):
        env = {"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0"}
        for repo in repos:
            result = grove_cli("auto-opt", "-m", repo, "-o", str(tmp_path / repo), "--store", store, env=env)
            assert result.returncode == 0, result.stderr[-3000:]
            report = json.loads((tmp_path / repo / "grove_report.json").read_text())
            download = next(n for n in report["lineage"] if n["node"] == "download-model")
            assert download["inputs"] == [repos[repo].sha], "the commit is the root of every cache key"
        missing = grove_cli("auto-opt", "-m", "grove-test/nobody", "-o", str(tmp_path / "x"), "--store", store, env=env)
        wrong = grove_cli("auto-opt", "-m", "grove-test/both", "--revision", "v9", "-o", str(tmp_path / "x"),
                          "--store", store, env=env)

    fetched = [r.split(" ", 1)[1] for r in requests if r.startswith("GET ") and "/resolve/" in r]
    assert f"/grove-test/bin-only/resolve/{'2' * 40}/pytorch_model.bin" in fetched
    assert {f"/grove-test/both/resolve/{'1' * 40}/model-0000{i}-of-00002.safetensors" for i in (1, 2)} <= set(fetched)
    unwanted = (".bin", ".md", "consolidated.safetensors")
    assert not [f for f in fetched if f.startswith("/grove-test/both/") and f.endswith(unwanted)], fetched
    assert missing.returncode == wrong.returncode == 2 and not (tmp_path / "x").exists()
    assert "grove: error: hub repo 'grove-test/nobody' was not found" in missing.stderr, missing.stderr
    assert "grove: error: hub repo 'grove-test/both' has no revision 'v9'" in wrong.stderr, wrong.stderr


def test_an_online_hub_dataset_file_is_read_as_the_evaluation_text(tiny_dir, tmp_path: Path, store: str) -> None:  # noqa: ANN001
    """--eval_data hf://datasets/<org>/<name>/<file> with the hub reachable (the loopback hub) scores
    the same text as the same file given as a path, and so does the hub's Parquet form of it (a
    "text" column of paragraphs, as wikitext); a file the dataset lacks is one error naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from grove.tasks._data_sources import BUILTIN_TEXT, read_text
    from tests.conftest import grove_cli
    from tests.hub_server import HubRepo, serve_hub

    texts = tmp_path / "texts"
    texts.mkdir()
    text = read_text(BUILTIN_TEXT)[5000:]
    (texts / "gpl.txt").write_text(text)
    # the hub's own format for datasets (wikitext's layout: one "text" column of paragraphs)
    pq.write_table(pa.table({"text": text.split("\n\n")}), texts / "test-00000-of-00001.parquet")
    model = str(tiny_dir("llama"))
    local = grove_cli("auto-opt", "-m", model, "-o", str(tmp_path / "local"), "--store", store,
                      "--eval_data", str(texts / "gpl.txt"))
    with serve_hub({"datasets/grove-test/texts": HubRepo(texts, "4" * 40)}) as (endpoint, requests):
        env = {"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0"}
        hub = grove_cli("auto-opt", "-m", model, "-o", str(tmp_path / "hub"), "--store", store,
                        "--eval_data", "hf://datasets/grove-test/texts/gpl.txt", env=env)
        table = grove_cli("auto-opt", "-m", model, "-o", str(tmp_path / "table"), "--store", store,
                          "--eval_data", "hf://datasets/grove-test/texts/test-00000-of-00001.parquet", env=env)
        missing = grove_cli("auto-opt", "-m", model, "-o", str(tmp_path / "x"), "--store", store,
                            "--eval_data", "hf://datasets/grove-test/texts/nope.txt", env=env)

    assert local.returncode == hub.returncode == table.returncode == 0, (hub.stderr + table.stderr)[-3000:]
    reports = [json.loads((tmp_path / d / "grove_report.json").read_text()) for d in ("local", "hub", "table")]
    assert reports[0]["metrics"]["perplexity"] == reports[1]["metrics"]["perplexity"] == \
        reports[2]["metrics"]["perplexity"]
    assert reports[0]["reference"]["perplexity"] == reports[1]["reference"]["perplexity"]
    fetched = [r for r in requests if r.startswith("GET ") and r.endswith("/resolve/main/gpl.txt")]
    assert len(fetched) == 1, f"read over the network once per machine, not per check and evaluation: {requests}"
    assert missing.returncode == 2 and not (tmp_path / "x").exists()
    assert "hf://datasets/grove-test/texts/nope.txt cannot be read" in missing.stderr
    assert "the hub has no such file: check the path" in missing.stderr, missing.stderr


def test_a_hub_ner_dataset_scores_a_token_classifier(tmp_path: Path, store: str) -> None:
    """--eval_data hf://datasets/.../<file>.parquet in conll2003's layout (tokens and ner_tags lists,
    the tags numbered in the dataset's own class order and named in its metadata) scores a token
    classifier through the CLI exactly as the same sentences in a local JSONL file do."""
    from grove.tasks import _encoder_io as eio
    from tests import tiny_models
    from tests.conftest import grove_cli
    from tests.hub_server import HubRepo, serve_hub

    folder = tiny_models.build_encoder("bert", tmp_path / "bert-ner", head="token")
    config = json.loads((folder / "config.json").read_text())
    classes = ["O", "B-PER", "I-PER"]
    config.update(id2label=dict(enumerate(classes)), label2id={c: i for i, c in enumerate(classes)})
    (folder / "config.json").write_text(json.dumps(config))
    sentences = [p.split()[:20] for p in eio.read_lines("builtin:GPL-3", 12)]
    tags = [[classes[(3 * n + i) % 3 if i % 4 else 0] for i in range(len(words))] for n, words in enumerate(sentences)]
    local_file = tmp_path / "ner.jsonl"
    local_file.write_text("".join(json.dumps({"tokens": w, "ner_tags": t}) + "\n"
                                  for w, t in zip(sentences, tags, strict=False)))
    data = tmp_path / "ner-data"
    data.mkdir()
    hub_order = ["O", "I-PER", "B-PER"]
    tiny_models.hub_ner_table(data / "test-00000-of-00001.parquet", sentences,
                              [[hub_order.index(t) for t in ts] for ts in tags], hub_order)
    local = grove_cli("auto-opt", "-m", str(folder), "-o", str(tmp_path / "local"), "--store", store,
                      "--eval_data", str(local_file))
    with serve_hub({"datasets/grove-test/ner": HubRepo(data, "5" * 40)}) as (endpoint, _):
        hub = grove_cli("auto-opt", "-m", str(folder), "-o", str(tmp_path / "hub"), "--store", store, "--eval_data",
                        "hf://datasets/grove-test/ner/test-00000-of-00001.parquet",
                        env={"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0"})

    assert local.returncode == hub.returncode == 0, (local.stderr + hub.stderr)[-3000:]
    reports = [json.loads((tmp_path / d / "grove_report.json").read_text()) for d in ("local", "hub")]
    for side in ("metrics", "reference"):
        got = {k: reports[1][side][k] for k in ("accuracy", "entity_f1")}
        assert got == {k: reports[0][side][k] for k in ("accuracy", "entity_f1")}, side
    assert "entity f1" in hub.stdout and "accuracy" in hub.stdout


def test_a_remote_evaluation_text_is_fetched_once_per_version(s3_store: str, s3_server: dict[str, str],  # noqa: ARG001
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import s3fs

    from grove.store import ArtifactStore
    from grove.tasks._data_sources import read_text

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    store = ArtifactStore(s3_store)
    store.fs.pipe(f"{store.root}/eval.txt", b"first version")
    uri = f"{s3_store}/eval.txt"
    assert read_text(uri) == "first version"
    copies = list((tmp_path / "xdg" / "grove" / "texts").rglob("eval.txt"))
    assert len(copies) == 1
    copies[0].write_text("the cached copy")  # what the next read returns if it does not fetch again
    assert read_text(uri) == "the cached copy"

    store.fs.pipe(f"{store.root}/eval.txt", b"second version")  # a new ETag
    s3fs.S3FileSystem.clear_instance_cache()
    assert read_text(uri) == "second version"


def test_unknown_hub_id_offline_says_how_to_supply_it() -> None:
    with pytest.raises(ModelSourceError, match=r"not in the local Hugging Face cache.*huggingface-cli download"):
        _sources.resolve("nobody/does-not-exist")


def test_missing_path() -> None:
    with pytest.raises(ModelSourceError, match="does not exist"):
        _sources.resolve("./no/such/model")


def test_truncated_gguf(tmp_path: Path) -> None:
    from tests.conftest import smollm2_gguf

    bad = tmp_path / "cut.gguf"
    bad.write_bytes(smollm2_gguf().read_bytes()[:1_000_000])
    with pytest.raises(ModelSourceError, match="truncated or corrupt"):
        _sources.resolve(str(bad))


def test_corrupt_safetensors_fails_at_download(tiny_dir, tmp_path: Path) -> None:  # noqa: ANN001
    folder = shutil.copytree(tiny_dir("llama"), tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ModelSourceError, match="not a valid safetensors file"):
        _download(_sources.resolve(str(folder)), DownloadConfig(), out)


def test_unsupported_architecture_lists_supported() -> None:
    with pytest.raises(UnsupportedArchitecture, match="not supported; supported: ") as err:
        arch_spec("mamba")
    assert {"gemma", "llama", "mistral", "phi3", "qwen2", "qwen3"} <= set(err.value.supported)


def test_fast_gguf_reader_reads_what_gguf_reads(tmp_path: Path) -> None:
    """Grove's reader (bulk string and number arrays) yields gguf's own fields and tensors, part
    for part: strings, string arrays (tokens), number arrays (token types, scores), scalars,
    an empty array, a nested array, and tensors."""
    import gguf
    import numpy as np

    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("general.name", "tiny ünïcode")
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "é", "", "hello world", "\u4e2d"] * 50)
    writer.add_array("tokenizer.ggml.token_type", [1, 2, 3, 4, 5] * 50)
    writer.add_array("tokenizer.ggml.scores", [0.5, -1.25, 3.0] * 7)
    writer.add_array("empty", [])
    writer.add_array("nested", [[1, 2], [3]])
    writer.add_uint32("llama.block_count", 2)
    writer.add_tensor("w", np.arange(64, dtype=np.float32).reshape(8, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    stock, fast = gguf.GGUFReader(str(path)), _sources.fast_gguf_reader()(str(path))
    assert list(stock.fields) == list(fast.fields)
    for name, want in stock.fields.items():
        got = fast.fields[name]
        assert (got.offset, got.types, got.data) == (want.offset, want.types, want.data), name
        assert len(got.parts) == len(want.parts), name
        for a, b in zip(got.parts, want.parts, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), name
    assert fast.fields["tokenizer.ggml.tokens"].contents()[:4] == ["<s>", "é", "", "hello world"]
    assert [(t.name, t.data_offset) for t in fast.tensors] == [(t.name, t.data_offset) for t in stock.tensors]
    assert np.array_equal(fast.tensors[0].data, stock.tensors[0].data)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_grouped_dequantize_equals_gguf(qtype: str) -> None:
    """The larger row groups used during a GGUF conversion give gguf's own values, bit for bit,
    including a last group shorter than the others (rows not a multiple of the group)."""
    import gguf
    import gguf.quants as gq
    import numpy as np

    kind = gguf.GGMLQuantizationType[qtype]
    values = np.random.default_rng(0).standard_normal((1000, 96)).astype(np.float32)
    packed = gq.quantize(values, kind)
    want = gq.dequantize(packed, kind)
    stock = gq._apply_over_grouped_rows
    try:
        gq._apply_over_grouped_rows = functools.partial(_sources.apply_over_row_groups, group_bytes=4096)
        got = gq.dequantize(packed, kind)
    finally:
        gq._apply_over_grouped_rows = stock
    assert got.shape == want.shape == values.shape
    assert np.array_equal(got, want)
    assert np.abs(got - values).max() < 0.6  # and it is a dequantization of the values


def test_an_s3_model_folder_is_a_source_keyed_by_its_objects(tiny_dir, tmp_path: Path, s3_store: str,  # noqa: ANN001
                                                              store: str) -> None:
    """`-m s3://bucket/folder`: listed and pinned by the objects' ETags and sizes, fetched for the
    run, and optimized like a local folder; a changed object is a new source, a wrong prefix one error."""
    import json

    import onnxruntime_genai as og

    from grove.store import ArtifactStore
    from tests.conftest import grove_cli

    uri = s3_store.rsplit("/", 1)[0] + "/models/tiny-llama"
    fs, root = ArtifactStore(uri).fs, uri.removeprefix("s3://")
    for f in tiny_dir("llama").iterdir():
        fs.put_file(str(f), f"{root}/{f.name}")
    source = _sources.resolve(uri)
    assert (source.kind, source.model_type) == ("s3", "llama")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(source.files)

    out = tmp_path / "out"
    result = grove_cli("auto-opt", "-m", uri, "-o", str(out), "--store", store, "--eval_tokens", "64")

    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "grove_report.json").read_text())
    assert report["model"] == uri and source.digest in json.dumps(report["lineage"]), "the source pins the run"
    og.Model(str(out))
    fs.pipe_file(f"{root}/tokenizer_config.json", fs.cat_file(f"{root}/tokenizer_config.json") + b"\n")
    assert _sources.resolve(uri).digest != source.digest
    with pytest.raises(ModelSourceError, match="has no config.json, so it is not a Hugging Face model folder"):
        _sources.resolve(uri + "-typo")
