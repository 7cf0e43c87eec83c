#!/usr/bin/env bash
# aarch64-unknown-linux-gnu (issue 15): cross-build libamend.a, libamend.so, the amend CLI and
# the C example with Debian's gcc-aarch64-linux-gnu, then run under qemu-aarch64 (qemu-user):
#   - the amend-edits tests (NEON kernels bitwise equal to the portable path, the streaming
#     verifier swept over the bad-input suite, and its memory figure on an ARM target);
#   - the runtime tests on the tiny models;
#   - the C example generating from gemma3 without, with and after rolling back a bundle,
#     compared with the x86-64 build (greedy; what is equal: below), and the CLI verifying the
#     bundle and generating the same text.
# Installs the cross compilers, qemu-user and the Rust target only when missing. aarch64 output
# goes to target/aarch64-unknown-linux-gnu (llama.cpp is cross-built there once by
# llama-cpp-sys-2's build script). Cost: see docs/targets.md ("aarch64 in make test").
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
T=aarch64-unknown-linux-gnu
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
CACHE="${AMEND_CACHE:-$HOME/.cache/amend}"
MODEL="${AMEND_MODEL:-$CACHE/gemma3-270m-q4_k_m.gguf}"
WORK=$(mktemp -d /tmp/amend-aarch64.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
t0=$(date +%s)
step() { echo "-- aarch64 ($(($(date +%s) - t0)) s): $*"; }
fail() { echo "aarch64: FAILED: $*" >&2; exit 1; }

SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
need=()
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || need+=(gcc-aarch64-linux-gnu)
command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || need+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null 2>&1 || need+=(qemu-user)
if [ ${#need[@]} -gt 0 ]; then
  step "installing ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
rustup target list --installed | grep -qx "$T" || rustup target add "$T"

# The cc crate already picks aarch64-linux-gnu-gcc/g++ for this target; only the Rust linker,
# bindgen's sysroot (llama.cpp's bindings) and qemu's library prefix need saying.
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export BINDGEN_EXTRA_CLANG_ARGS_aarch64_unknown_linux_gnu="--sysroot=/usr/aarch64-linux-gnu"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER=qemu-aarch64
export QEMU_LD_PREFIX=/usr/aarch64-linux-gnu
OUT="$TARGET_DIR/$T/release"
# Every cross cargo call selects the same packages: cargo resolves the host (build-script,
# proc-macro) features per selection, and a different set (e.g. -p amend-cli alone adds syn's
# "visit") rebuilds bindgen, hence llama-cpp-sys-2's build script, hence all of llama.cpp.
SEL=(-p amend-edits -p amend-runtime -p amend-ffi -p amend-cli)

step "cross-building libamend.a, libamend.so and the amend CLI"
nice cargo build --release --target "$T" "${SEL[@]}"
for f in libamend.a libamend.so amend; do
  [ -f "$OUT/$f" ] || fail "$OUT/$f missing"
done
for f in libamend.so amend; do
  readelf -h "$OUT/$f" | grep -q AArch64 || fail "$f is not aarch64"
done

step "amend-edits tests under qemu"
# fuzz_corpus (70k mutations) runs natively; under emulation it adds minutes for no ARM-specific gain.
log="$WORK/edits-tests.log"
# amend-edits does not depend on llama.cpp, so selecting it alone rebuilds nothing big.
nice cargo test --release --target "$T" -p amend-edits --test bad_inputs --test stream_verify \
  --test roundtrip --test editset -- --nocapture >"$log" 2>&1 || { tail -40 "$log"; fail "amend-edits tests under qemu"; }
grep -E "^test result|stream verifier" "$log"
nice cargo test --release --target "$T" -p amend-edits --lib -q >"$log" 2>&1 \
  || { tail -40 "$log"; fail "amend-edits unit tests (NEON kernels) under qemu"; }
grep -E "^test result: ok. [1-9]" "$log" | head -3

step "runtime tests on the tiny models under qemu"
# Every tiny-model test runs (one compares logit rows to 1e-4 on aarch64 instead of bitwise:
# aarch64 ggml sums the output projection in another order when fewer rows are asked for), but
# the fork test: qemu-user cannot fork a guest that has threads (qemu's own assertion,
# `cpu == current_cpu`, ends the child), which says nothing about aarch64.
nice cargo test --release --target "$T" "${SEL[@]}" --test tiny_model -q -- \
  --skip session_made_before_fork_evaluates_in_the_child >"$log" 2>&1 \
  || { tail -40 "$log"; fail "runtime tiny_model tests under qemu"; }
grep -E "^test result" "$log"

if [ ! -f "$MODEL" ]; then
  [ "${AMEND_REQUIRE_MODEL:-0}" = 1 ] && fail "model $MODEL missing (AMEND_REQUIRE_MODEL=1)"
  echo "aarch64: model $MODEL missing: the gemma3 comparison is skipped"
else

SCOPE="${AMEND_SCOPE_MODEL:-$CACHE/all-minilm-l6-v2-q8_0.gguf}"
[ -f "$SCOPE" ] || fail "scope model $SCOPE missing (make scope-model)"
step "C example: aarch64 under qemu vs x86-64, gemma3, greedy, 8 tokens"
libs=$(sed -n 's/^Libs.private: //p' ffi/pkgconfig/amend.pc.in)
# shellcheck disable=SC2086
aarch64-linux-gnu-gcc -std=c11 -Wall -Wextra -Werror -O2 -Iinclude examples/c/amend_demo.c \
  "$OUT/libamend.a" $libs -o "$WORK/amend_demo-aarch64"
readelf -h "$WORK/amend_demo-aarch64" | grep -q AArch64 || fail "demo is not aarch64"
cargo build --release -p amend-ffi --lib --examples >/dev/null 2>&1 || fail "host amend-ffi build"
# shellcheck disable=SC2086
gcc -std=c11 -O2 -Iinclude examples/c/amend_demo.c "$TARGET_DIR/release/libamend.a" $libs \
  -o "$WORK/amend_demo-x86_64"
"$TARGET_DIR/release/examples/make_test_bundles" "$MODEL" "$WORK/bundles" "$SCOPE" >/dev/null
ids() { echo "$1" | sed -n "s/^$2: //p"; }
both() { # runs the demo natively and under qemu with the same arguments
  x86=$("$WORK/amend_demo-x86_64" "$@")
  local s; s=$(date +%s)
  arm=$(qemu-aarch64 "$WORK/amend_demo-aarch64" "$@")
  echo "aarch64 demo under qemu: $(($(date +%s) - s)) s"
  echo "$arm"
}
key=$(cat "$WORK/bundles/key.pub")

# The retrieval memory (the product's first family): the scope model routes the prompt on
# aarch64 ggml, the answer is forced through amend's own code, the rest is the base model.
# Checked: the tokens before the bundle and after rolling it back equal x86-64's; with the bundle
# the answer equals x86-64's, and on each architecture the tokens after it are exactly that
# architecture's base model continuing prompt + answer (the memory adds the answer and nothing
# else). Where the two architectures' continuations part, the base model parts there too, without
# any bundle: gemma3 continues "The capital of France is Berlin" with ", and it is the" on x86-64
# ggml and ", and the city is a" on aarch64 ggml (their Q4_K kernels sum in other orders and a
# near-tie flips), so that difference is llama.cpp's, not the bundle's (docs/targets.md).
both --model "$MODEL" --tokens 8 --ids --bundle "$WORK/bundles/serac.amend" --key "$key" --scope-model "$SCOPE"
for label in "before ids" "rolled back ids"; do
  [ -n "$(ids "$x86" "$label")" ] && [ "$(ids "$arm" "$label")" = "$(ids "$x86" "$label")" ] \
    || fail "serac.amend, $label: aarch64 '$(ids "$arm" "$label")' != x86-64 '$(ids "$x86" "$label")'"
done
a=($(ids "$arm" "after  ids")); x=($(ids "$x86" "after  ids"))
[ "${#a[@]}" -eq 8 ] && [ "${a[0]}" = "${x[0]}" ] || fail "serac.amend answer: aarch64 '${a[*]}' vs x86-64 '${x[*]}'"
[ "${a[*]}" != "$(ids "$arm" "before ids")" ] || fail "serac.amend did not change the tokens"
# Each architecture's base model on prompt + answer (" Berlin", the memory's target).
bx=$("$WORK/amend_demo-x86_64" --model "$MODEL" --tokens 7 --ids --prompt "The capital of France is Berlin")
ba=$(qemu-aarch64 "$WORK/amend_demo-aarch64" --model "$MODEL" --tokens 7 --ids --prompt "The capital of France is Berlin")
[ "$(ids "$bx" "before ids")" = "${x[*]:1}" ] || fail "x86-64: tokens after the answer '${x[*]:1}' != base model '$(ids "$bx" "before ids")'"
[ "$(ids "$ba" "before ids")" = "${a[*]:1}" ] || fail "aarch64: tokens after the answer '${a[*]:1}' != base model '$(ids "$ba" "before ids")'"
# The cross-built amend CLI under qemu: verifies the bundle and generates the aarch64 C example's
# edited text.
qemu-aarch64 "$OUT/amend" verify "$WORK/bundles/serac.amend" --pubkey "$WORK/bundles/key.pub" \
  || fail "amend verify under qemu"
cli=$(qemu-aarch64 "$OUT/amend" run --model "$MODEL" --prompt "The capital of France is" \
  --max-tokens 8 --temp 0 --bundle "$WORK/bundles/serac.amend" --pubkey "$WORK/bundles/key.pub" \
  --scope-model "$SCOPE" 2>/dev/null) || fail "amend run under qemu"
[ "The capital of France is$cli" = "$(ids "$arm" "after ")" ] \
  || fail "amend run under qemu: '$cli' != the C example's '$(ids "$arm" "after ")'"
echo "amend run under qemu: $cli"
same=0; while [ $same -lt ${#a[@]} ] && [ "${a[$same]}" = "${x[$same]}" ]; do same=$((same + 1)); done
step "ok: serac.amend: base and rolled-back tokens equal x86-64's; with it the answer is equal and each architecture continues exactly as its base model does ($same/8 tokens equal across architectures)"

# A low-rank delta runs through ggml's adapter matmuls, which aarch64 and x86-64 ggml sum in
# different orders: measured here, the first 6 of 8 greedy tokens agree (" Paris, the largest
# city in"), then a near-tie flips (docs/targets.md). So: the edited answer (first token) equal,
# and the bundle changes the output.
both --model "$MODEL" --tokens 8 --ids --bundle "$WORK/bundles/lora.amend" --key "$key"
a=($(ids "$arm" "after  ids")); x=($(ids "$x86" "after  ids"))
[ "${#a[@]}" -gt 0 ] && [ "${a[0]}" = "${x[0]}" ] || fail "lora.amend first token: aarch64 '${a[*]}' vs x86-64 '${x[*]}'"
same=0; while [ $same -lt ${#a[@]} ] && [ "${a[$same]}" = "${x[$same]}" ]; do same=$((same + 1)); done
[ "${a[*]}" != "$(ids "$arm" "before ids")" ] || fail "lora.amend did not change the aarch64 tokens"
step "ok: lora.amend, aarch64 and x86-64 agree on the first $same of ${#x[@]} tokens"
fi

step "done"
