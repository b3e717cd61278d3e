#!/usr/bin/env bash
# README command 2: install the test dependencies, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh test
exec .venv/bin/python -m pytest "$@"
