#!/usr/bin/env bash
# amend-edits on a real no_std target (issue 15): the crate without std for a Cortex-M4F
# (thumbv7em-none-eabihf), then a firmware-shaped staticlib (examples/firmware: no_std, no
# #[global_allocator], panic = abort) that links the streaming verifier; rustc refuses to build
# it if anything in it needs an allocator. Installs the Rust target only when missing.
# Takes ~1.5 min cold on 2 cores, a few seconds warm.
set -euo pipefail
cd "$(dirname "$0")/../.."
T=thumbv7em-none-eabihf
rustup target list --installed | grep -qx "$T" || rustup target add "$T"
cargo build -p amend-edits --no-default-features --target "$T" --release
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}/firmware" \
  cargo build --manifest-path examples/firmware/Cargo.toml --target "$T" --release --locked
lib="${CARGO_TARGET_DIR:-$PWD/target}/firmware/$T/release/libamend_firmware_check.a"
bss=$(nm -S "$lib" 2>/dev/null | sed -n 's/^[0-9a-f]* \([0-9a-f]*\) b .*firmware_check5STATE.*/\1/p' | head -1)
[ -n "$bss" ] && echo "no_std: verifier state in .bss on $T: $((16#$bss)) bytes"
echo "no_std: amend-edits and the allocator-free streaming verifier build for $T"
