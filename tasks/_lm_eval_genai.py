"""lm-evaluation-harness requests served by onnxruntime-genai: the model class the ``evaluate-lm``
node hands the harness for a Grove output (Olive's LMEvaluator calls its own ``ortgenai``).

Text is tokenized by the folder's Hugging Face tokenizer (the files the output ships, so the token ids
are the ones the PyTorch model's evaluation reads); log-likelihoods come from the graph's teacher-forced
logits (``_genai_runtime.logits``: one prefill per request, or a token at a time for a pruned lm_head);
generation is greedy in onnxruntime-genai's generator, cut at the task's stop strings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from lm_eval.api.model import TemplateLM

from grove.tasks import _genai_runtime as runtime

__all__ = ["GenaiLM"]


class GenaiLM(TemplateLM):
    """An onnxruntime-genai folder as an lm-eval model (causal, one request at a time)."""

    def __init__(self, folder: Path, provider: str = "cpu", max_length: int | None = None) -> None:
        super().__init__()
        from transformers import AutoTokenizer

        self.folder = folder
        self.model = runtime.genai_model(folder, provider)
        self.hf_tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.min_cache = runtime.kv_floor(folder)
        self.max_length = max_length or runtime.context_length(folder) or 2048
        eos = json.loads((folder / "genai_config.json").read_text())["model"].get("eos_token_id")
        self._eot = int(eos[0] if isinstance(eos, list) else eos if eos is not None
                        else self.hf_tokenizer.eos_token_id)

    # -- what the harness asks of a model -------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def prefix_token_id(self) -> int:
        bos = self.hf_tokenizer.bos_token_id
        return int(bos) if bos is not None else self._eot

    @property
    def tokenizer_name(self) -> str:
        return str(self.folder).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_: Any) -> list[int]:
        return list(self.hf_tokenizer.encode(string, add_special_tokens=bool(add_special_tokens)))

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return str(self.hf_tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                          add_generation_prompt=add_generation_prompt))

    def _loglikelihood_tokens(self, requests: list[Any], disable_tqdm: bool = False,
                              **_: Any) -> list[tuple[float, bool]]:
        out = []
        for _key, context, continuation in requests:
            whole = (context + continuation)[-(self.max_length + 1):]
            scores = self._log_softmax(runtime.logits(self.model, whole[:-1], self.min_cache))
            rows = scores[-len(continuation):]
            picked = rows[np.arange(len(continuation)), continuation]
            out.append((float(picked.sum()), bool((rows.argmax(-1) == np.asarray(continuation)).all())))
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        totals = []
        for (text,) in (r.args for r in requests):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
            totals.append(sum(score for score, _ in scores))
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        import onnxruntime_genai as og

        out = []
        for context, kwargs in (r.args for r in requests):
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            new = int(kwargs.get("max_gen_toks", 256))
            ids = self.tok_encode(context)[-(self.max_length - new):]
            params = og.GeneratorParams(self.model)
            params.set_search_options(max_length=max(len(ids) + new, self.min_cache), do_sample=False)
            generator = og.Generator(self.model, params)
            generator.append_tokens(ids)
            produced: list[int] = []
            text = ""
            while not generator.is_done() and len(produced) < new:
                generator.generate_next_token()
                produced.append(int(generator.get_next_tokens()[0]))
                text = str(self.hf_tokenizer.decode(produced, skip_special_tokens=True))
                if produced[-1] == self._eot or any(stop in text for stop in until):
                    break
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out

    @staticmethod
    def _log_softmax(logits: np.ndarray) -> np.ndarray:
        import torch

        return torch.log_softmax(torch.from_numpy(logits).double(), dim=-1).numpy()
