#!/usr/bin/env bash
# The static checks, run by scripts/test.sh before the suite (rules in pyproject.toml):
#  - ruff (lint and import order);
#  - the four floors (core < tasks < flows < shell, docs/design.md): import-linter's contracts, on Grove
#    as installed: a non-editable install into a scratch folder (the editable install maps tasks/ and
#    flows/ to grove.tasks / grove.flows through an import hook, which import-linter's scan cannot
#    follow), which must put nothing but `grove` in site-packages;
#  - mypy, on the same install.
set -euo pipefail
cd "$(dirname "$0")/.."
here="$PWD"
.venv/bin/ruff check --quiet . || { echo "grove check: ruff found the problems above" >&2; exit 1; }
scratch="$(mktemp -d)"
[ -e build ] && keep_build=1 || keep_build=0  # setuptools builds in ./build: leave the tree as it was
trap 'rm -rf "$scratch"; [ "$keep_build" = 1 ] || rm -rf "$here/build"' EXIT
.venv/bin/python -m pip install -q --no-deps --no-compile --target "$scratch/site" . 2>/dev/null
extra="$(cd "$scratch/site" && ls -d -- * | grep -v -x -e grove -e bin -e 'grove-.*\.dist-info' || true)"
if [ -n "$extra" ]; then
  echo "grove check: installing Grove puts more than the grove package in site-packages: $extra" >&2
  exit 1
fi
cd "$scratch/site"
PYTHONPATH="$scratch/site" "$here/.venv/bin/lint-imports" --no-cache "$here/pyproject.toml" >"$scratch/layers.log" 2>&1 || {
  sed -n '/Broken contracts/,$p' "$scratch/layers.log" >&2
  echo "grove check: an import crosses a floor the wrong way (contracts: pyproject.toml [tool.importlinter])" >&2
  exit 1
}
echo "grove check: the floors' contracts are kept ($(grep -o 'Analyzed.*' "$scratch/layers.log"))" >&2
"$here/.venv/bin/mypy" --config-file "$here/pyproject.toml" --cache-dir "$here/.venv/.mypy_cache" -p grove >&2 || {
  echo "grove check: mypy found the problems above ([tool.mypy] in pyproject.toml)" >&2
  exit 1
}
