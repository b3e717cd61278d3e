"""GGUF files of each architecture Grove reads them for, written as llama.cpp's converter writes
them (tests/tiny_models.write_gguf): the model Grove rebuilds from one is the model it was written
from, logits and tokenizer alike."""

from __future__ import annotations

from pathlib import Path

import pytest

from grove.errors import UnsupportedArchitecture
from grove.node import store_for
from grove.tasks.architectures import ARCHITECTURES
from grove.tasks.download_model import DownloadConfig, download_model, resolve_source
from tests import tiny_models

TEXT = "This program is free software: you can redistribute it and/or modify it under the terms " * 3
GGUF_FAMILIES = sorted(m for m, spec in ARCHITECTURES.items() if spec.gguf)


def test_every_gguf_family_has_a_tiny_gguf() -> None:
    assert set(GGUF_FAMILIES) <= set(tiny_models.GGUF_ARCH)


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_gguf_rebuilds_the_model_it_was_written_from(family: str, tmp_path: Path, store: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A GGUF carries no layer pattern: Gemma 3 takes transformers' default (5 sliding layers, then 1 global).
    overrides = {"layer_types": None} if family == "gemma3_text" else {}
    folder = tiny_models.build(family, tmp_path / family, **overrides)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():  # norms away from their init, so Gemma's 1 + w (and any dropped norm) shows
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(folder)
    gguf_file = tiny_models.write_gguf(folder, tmp_path / f"{family}.gguf")

    source = resolve_source.fn(str(gguf_file))
    # llama.cpp writes a Mistral as a llama (the same network when it has no sliding window).
    assert (source.kind, source.model_type) == ("gguf", "llama" if family == "mistral" else family)
    artifact = download_model.fn(source, DownloadConfig(), store)
    rebuilt_dir = store_for(artifact.store).fetch(artifact.node, artifact.digest)
    rebuilt = AutoModelForCausalLM.from_pretrained(rebuilt_dir).eval()
    ids = AutoTokenizer.from_pretrained(folder)(TEXT, return_tensors="pt").input_ids
    assert torch.equal(AutoTokenizer.from_pretrained(rebuilt_dir)(TEXT, return_tensors="pt").input_ids, ids)
    assert ids.shape[1] > (getattr(model.config, "sliding_window", None) or 0)  # past any sliding window
    with torch.no_grad():
        diff = (rebuilt(ids).logits - model(ids).logits).abs().max().item()
    # fp32 tensors, written and read back: the same model, bit for bit (transformers' defaults for
    # Qwen3's head width and Gemma's query scale were 128 and 256; Grove reads them from the file).
    assert diff < 1e-5, f"{family}: logits {diff:.3g} off"


def test_gguf_of_an_architecture_transformers_cannot_read(tiny_dir, tmp_path: Path) -> None:  # noqa: ANN001
    gguf_file = tiny_models.write_gguf(tiny_dir("gemma"), tmp_path / "gemma.gguf")
    with pytest.raises(UnsupportedArchitecture, match="Hugging Face folder or hub id") as caught:
        resolve_source.fn(str(gguf_file))
    assert caught.value.supported == GGUF_FAMILIES
