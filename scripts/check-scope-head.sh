#!/usr/bin/env bash
# Rebuilds the shipped scope head (data/scope-head.safetensors) with the command recorded in its
# own `trained_with` metadata, from the data/ files it names, and compares the result byte for
# byte. ~2 minutes on 2 cores. Not part of `make test`: training reads floats from llama.cpp and
# candle kernels chosen for the CPU (AVX-512, AVX2, NEON), and another CPU's rounding gives
# another head (docs/methods.md, "The scope head"); the recipe and the data's sha256 are checked
# on every machine by compiler/tests/data_sets.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
AMEND="${AMEND:-target/release/amend}"
HEAD_FILE=data/scope-head.safetensors
# The safetensors header is JSON right after its 8-byte length; the command holds no quotes.
cmd=$(head -c 65536 "$HEAD_FILE" | grep -ao '"trained_with":"[^"]*"' | sed 's/^"trained_with":"//; s/"$//') || true
if [ -z "$cmd" ]; then
  echo "check-scope-head: $HEAD_FILE records no trained_with command" >&2; exit 1
fi
# "amend VERSION scope-model train-head --data NAME ..." -> this binary, data/NAME.
read -r -a args <<<"$(sed -E 's/^amend [^ ]+ //; s/(--data|--calibrate) /\1 data\//g' <<<"$cmd")"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
echo "check-scope-head: $cmd" >&2
"$AMEND" "${args[@]}" --out "$out/head.safetensors" >&2
if cmp -s "$out/head.safetensors" "$HEAD_FILE"; then
  echo "check-scope-head: rebuilt byte for byte"
else
  echo "check-scope-head: the rebuilt head differs from $HEAD_FILE (another CPU's kernels, or" \
    "a change to training or to the scope model)" >&2
  exit 1
fi
