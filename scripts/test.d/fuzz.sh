#!/usr/bin/env bash
# Bounded fuzzing of the bundle reader, the manifest decoder (issue 3), the signed,
# structure-aware bundle builder (issue 11: every input gets past the signature) and the GGUF
# parser with every pre-load model check and the GGUF-LoRA reader, a minute each (~4.5 min in all
# with the build on a 2-core machine).
# cargo-fuzz needs nightly-only flags; RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them
# (no sanitizer: Rust's own bounds checks and debug assertions (-a) are what trip).
# Longer run: see docs/bundle-format.md ("Fuzzing"). AMEND_FUZZ_SECONDS sets the time per target.
# Without cargo-fuzz (and no way to install it) the same logic still runs as the plain test
# edits/tests/fuzz_corpus.rs (seed corpus + 70k random mutations) under `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/../.."
SECS="${AMEND_FUZZ_SECONDS:-60}"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz (once)"
  if ! cargo install cargo-fuzz --locked --quiet; then
    echo "fuzz: cargo-fuzz unavailable; running the seed-corpus mutation test instead"
    exec cargo test --release -p amend-edits --test fuzz_corpus
  fi
fi

cd fuzz
export RUSTC_BOOTSTRAP=1
status=0
for target in bundle_reader manifest_decoder signed_bundle gguf_model; do
  # The GGUF seeds are whole tiny models (200-240 KB; the parser needs their tensor data).
  maxlen=65536
  [ "$target" = gguf_model ] && maxlen=262144
  work="$(mktemp -d)"
  log="$(mktemp)"
  echo "fuzz: $target for ${SECS}s"
  if cargo fuzz run -O -a --sanitizer none "$target" "$work" "seeds/$target" -- \
      -max_total_time="$SECS" -print_final_stats=1 -max_len="$maxlen" >"$log" 2>&1; then
    grep -E 'stat::number_of_executed_units|stat::new_units_added' "$log" | sed "s/^/fuzz: $target /" || true
  else
    status=1
    echo "fuzz: $target FAILED (crash input under fuzz/artifacts/$target):"
    tail -40 "$log"
  fi
  rm -rf "$work" "$log"
done
exit "$status"
