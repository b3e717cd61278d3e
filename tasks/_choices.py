"""The choices that node configs take and requests name too, in a module that imports nothing heavy:
the CLI builds its parser from the requests (grove.flows.flags) before Prefect or torch are imported."""

from __future__ import annotations

from typing import Literal

__all__ = ["MIXED_PRECISION_HEURISTICS", "EncoderTask", "Int4Algorithm", "MixedPrecisionAlgorithm"]

Int4Algorithm = Literal["affine", "rtn", "hqq", "k_quant", "builder", "gptq"]
EncoderTask = Literal["feature-extraction", "text-classification", "token-classification"]
# tasks/_mixed_precision.py: Grove's output error, Olive's scores, then its fixed heuristics
MixedPrecisionAlgorithm = Literal["output_error", "kld_gradient", "snr", "snr_relative", "iqe", "iqe_relative",
                                  "high_precision_lm_head", "high_precision_mlp_down", "high_precision_mlp_down_qkv"]
# The ones that choose by position alone: no ratio, no calibration data.
MIXED_PRECISION_HEURISTICS = ("high_precision_lm_head", "high_precision_mlp_down", "high_precision_mlp_down_qkv")
