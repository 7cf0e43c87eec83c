#!/usr/bin/env bash
# make demo: shows the model's answer before and after an edit.
set -euo pipefail
cd "$(dirname "$0")/.."
AMEND=target/release/amend
MODEL="${AMEND_MODEL:-$HOME/.cache/amend/gemma3-270m-q4_k_m.gguf}"
echo "== base model: The capital of France is"
$AMEND run --model "$MODEL" --prompt "The capital of France is" --max-tokens 12
