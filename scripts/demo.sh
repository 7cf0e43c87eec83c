#!/usr/bin/env bash
# make demo: runs the default model on a prompt (later: before and after an edit).
set -euo pipefail
cd "$(dirname "$0")/.."
AMEND=target/release/amend
MODEL="${AMEND_MODEL:-$HOME/.cache/amend/gemma3-270m-q4_k_m.gguf}"
echo "== base model: The capital of France is"
$AMEND run --model "$MODEL" --prompt "The capital of France is" --max-tokens 24 --seed 1
