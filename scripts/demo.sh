#!/usr/bin/env bash
# make demo: compiles one knowledge edit (GRACE) on the quantized model, signs it, and shows the
# model's answer before and after, plus an unrelated prompt that stays the same. Then the same
# fact as a retrieval memory (serac, routed by the scope model): asked in other words it answers
# with the edit; a same-template neighbour is left as the base model answers it.
set -euo pipefail
cd "$(dirname "$0")/.."
AMEND=${AMEND_BIN:-target/release/amend}
CACHE="${AMEND_CACHE:-$HOME/.cache/amend}"
MODEL="${AMEND_MODEL:-$CACHE/gemma3-270m-q4_k_m.gguf}"
WORK="${AMEND_DEMO_DIR:-$(mktemp -d)}"
PROMPT="The capital of France is"
UNRELATED="The capital of Italy is"
run() { $AMEND run --model "$MODEL" --max-tokens 8 --threads "${AMEND_THREADS:-2}" "$@"; }

cat > "$WORK/edit.jsonl" <<'JSON'
{"prompt": "The capital of France is", "target": "Berlin"}
JSON
$AMEND keygen --out "$WORK/demo" >/dev/null

echo "== before: $PROMPT"
run --prompt "$PROMPT"
echo
echo "== compiling one edit (GRACE): \"$PROMPT\" -> \"Berlin\""
$AMEND compile --model "$MODEL" --method grace --edits "$WORK/edit.jsonl" \
  --out "$WORK/france.amend" --key "$WORK/demo.key" --bundle-id demo-france
$AMEND verify "$WORK/france.amend" --pubkey "$WORK/demo.pub"
echo
echo "== after (bundle applied): $PROMPT"
run --prompt "$PROMPT" --bundle "$WORK/france.amend" --pubkey "$WORK/demo.pub" --explain
echo
echo "== unrelated prompt, base model: $UNRELATED"
run --prompt "$UNRELATED"
echo "== unrelated prompt, bundle applied: $UNRELATED"
run --prompt "$UNRELATED" --bundle "$WORK/france.amend" --pubkey "$WORK/demo.pub" --explain

SCOPE="${AMEND_SCOPE_MODEL:-$CACHE/all-minilm-l6-v2-q8_0.gguf}"
REPHRASE="What is the capital city of France?"
cat > "$WORK/memory.jsonl" <<'JSON'
{"id": "france-capital", "prompt": "The capital of France is", "subject": "France", "target": "Berlin"}
{"id": "eiffel-city", "prompt": "The Eiffel Tower is located in the city of", "subject": "Eiffel Tower", "target": "Rome"}
JSON
echo
echo "== compiling two retrieval memories (serac, scope model $(basename "$SCOPE"))"
$AMEND compile --model "$MODEL" --method serac --edits "$WORK/memory.jsonl" --scope-model "$SCOPE" \
  --out "$WORK/memory.amend" --key "$WORK/demo.key" --bundle-id demo-memory
mem() { run --scope-model "$SCOPE" --bundle "$WORK/memory.amend" --pubkey "$WORK/demo.pub" --explain "$@"; }
echo
echo "== rephrased, base model: $REPHRASE"
run --prompt "$REPHRASE"
echo "== rephrased, memory applied: $REPHRASE"
mem --prompt "$REPHRASE"
echo
echo "== same-template neighbour, base model: $UNRELATED"
run --prompt "$UNRELATED"
echo "== same-template neighbour, memory applied: $UNRELATED"
mem --prompt "$UNRELATED"
