#!/usr/bin/env bash
# Installs the package into a venv in the cache directory ($AMEND_CACHE, else ~/.cache/amend;
# pytest added only if missing) and runs its tests against AMEND_LIBRARY (default:
# target/release/libamend.so).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
AMEND_LIBRARY=$(realpath "${AMEND_LIBRARY:-$ROOT/target/release/libamend.so}")
export AMEND_LIBRARY
export AMEND_HEADER="$ROOT/include/amend.h"
if [ -n "${AMEND_REFERENCE_BIN:-}" ]; then
  AMEND_REFERENCE_BIN=$(realpath "$AMEND_REFERENCE_BIN")
  export AMEND_REFERENCE_BIN
fi
cd "$(dirname "$0")"
CACHE="${AMEND_CACHE:-$HOME/.cache/amend}"
# The tests' own default is ~/.cache/amend: name the models under $AMEND_CACHE for them.
export AMEND_MODEL="${AMEND_MODEL:-$CACHE/gemma3-270m-q4_k_m.gguf}"
export AMEND_SCOPE_MODEL="${AMEND_SCOPE_MODEL:-$CACHE/all-minilm-l6-v2-q8_0.gguf}"
VENV="$CACHE/venv-bindings"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -c "import pytest" 2>/dev/null || "$VENV/bin/pip" install -q pytest
"$VENV/bin/python" -c "import setuptools, wheel" 2>/dev/null || "$VENV/bin/pip" install -q setuptools wheel
# A real pip install (non-editable) of a copy of this package (the build leaves egg-info and
# build/ behind, which must not land in the source tree), then test the installed copy.
TMP=$(mktemp -d /tmp/amend-py.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
cp -r pyproject.toml README.md amend tests "$TMP/"
"$VENV/bin/pip" install -q --no-build-isolation --force-reinstall --no-deps "$TMP" >/dev/null
cd "$TMP/tests" && rm -rf ../amend && "$VENV/bin/python" -m pytest -q -p no:cacheprovider .
