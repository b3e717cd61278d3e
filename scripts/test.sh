#!/usr/bin/env bash
# README command 2: install the test dependencies, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh test
# The dashboard test drives a real browser: Debian's chromium (Playwright's own browser
# download is not used). Installed here when missing and we may.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "grove test: installing Debian's chromium for the dashboard test" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null
fi
# The load test on the stack with Postgres starts a real PostgreSQL server: Debian's postgresql
# (its binaries are in /usr/lib/postgresql/<major>/bin). Installed here when missing and we may.
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "grove test: installing Debian's postgresql for the stack load test" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >/dev/null
fi
./scripts/check.sh  # ruff, the four floors' import contracts, mypy
exec .venv/bin/python -m pytest "$@"
