#!/usr/bin/env bash
# Checks beyond `cargo test` that make test runs: each part is added by the issue that needs it.
set -euo pipefail
cd "$(dirname "$0")/.."
for part in scripts/test.d/*.sh; do
  [ -e "$part" ] || continue
  echo "== $part"
  bash "$part"
done
