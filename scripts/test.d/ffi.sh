#!/usr/bin/env bash
# The C ABI beyond `cargo test`: the native libraries a static link needs (pinned), the C
# misuse tests under valgrind (model-free part) and AddressSanitizer+UBSan (with the model),
# the C example built through pkg-config and CMake from an installed copy, and the Python,
# Java and Swift binding tests. Installs only what is missing (apt, pip into a venv).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
CACHE="${AMEND_CACHE:-$HOME/.cache/amend}"
MODEL="${AMEND_MODEL:-$CACHE/gemma3-270m-q4_k_m.gguf}"
WORK=$(mktemp -d /tmp/amend-ffi-test.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
step() { echo "-- ffi: $*"; }
fail() { echo "ffi: FAILED: $*" >&2; exit 1; }

SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
need=()
command -v valgrind >/dev/null 2>&1 || need+=(valgrind)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v javac >/dev/null 2>&1 || need+=(openjdk-17-jdk-headless)
command -v python3 >/dev/null 2>&1 || need+=(python3)
python3 -c 'import ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
command -v g++ >/dev/null 2>&1 || need+=(g++)
if [ ${#need[@]} -gt 0 ]; then
  step "installing ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

have_model=1
if [ ! -f "$MODEL" ]; then
  [ "${AMEND_REQUIRE_MODEL:-0}" = 1 ] && fail "model $MODEL missing (AMEND_REQUIRE_MODEL=1)"
  echo "ffi: model $MODEL missing: model tests skipped"
  have_model=0
fi
export AMEND_MODEL="$MODEL"
# The scope model serac bundles route with (scripts/fetch-scope-model.sh); its tests skip without it.
SCOPE_MODEL="${AMEND_SCOPE_MODEL:-$CACHE/all-minilm-l6-v2-q8_0.gguf}"
scope_args=()
if [ -f "$SCOPE_MODEL" ]; then
  export AMEND_SCOPE_MODEL="$SCOPE_MODEL"
  scope_args=("$SCOPE_MODEL")
else
  [ "${AMEND_REQUIRE_MODEL:-0}" = 1 ] && fail "scope model $SCOPE_MODEL missing (AMEND_REQUIRE_MODEL=1)"
  echo "ffi: scope model $SCOPE_MODEL missing: scope-model tests skipped"
fi

# 1. Build both libraries and pin the native libraries a static link needs (as rustls-ffi's
#    static_libs test): a new one must be added to amend.pc.in and amendConfig.cmake.
step "building libamend.a / libamend.so"
out=$(cargo rustc -p amend-ffi --release --lib --crate-type staticlib --crate-type cdylib \
  -- --print native-static-libs 2>&1) || { echo "$out"; fail "cargo rustc"; }
libs=$(echo "$out" | sed -n 's/.*native-static-libs: //p' | head -1)
pinned=$(sed -n 's/^Libs.private: //p' ffi/pkgconfig/amend.pc.in)
[ "$libs" = "$pinned" ] || fail "native-static-libs changed: rustc says '$libs', amend.pc.in pins '$pinned'"
cmake_libs=$(sed -n 's/^set(AMEND_STATIC_NATIVE_LIBS \(.*\))$/\1/p' ffi/cmake/amendConfig.cmake)
[ "$(echo "$pinned" | sed 's/-l//g')" = "$cmake_libs" ] || fail "amendConfig.cmake libs '$cmake_libs' differ from '$pinned'"
echo "static link needs: $libs"
LIBA="$TARGET_DIR/release/libamend.a"
LIBSO="$TARGET_DIR/release/libamend.so"

# Rust-side helpers: the Rust API reference generator and the signed test bundles.
cargo build --release -p amend-ffi --examples >/dev/null 2>&1 || fail "building ffi examples"
export AMEND_REFERENCE_BIN="$TARGET_DIR/release/examples/reference"
if [ $have_model = 1 ]; then
  "$TARGET_DIR/release/examples/make_test_bundles" "$MODEL" "$WORK/bundles" "${scope_args[@]}" >/dev/null
  export AMEND_TEST_BUNDLES="$WORK/bundles"
fi

# The header alone compiles as strict C99 and as C++ (cbindgen's cpp_compat).
printf '#include "amend.h"\nint main(void) { return 0; }\n' >"$WORK/h.c"
gcc -std=c99 -pedantic -Wall -Wextra -Werror -Iinclude -fsyntax-only "$WORK/h.c" || fail "amend.h as C99"
g++ -std=c++11 -pedantic -Wall -Wextra -Werror -Iinclude -x c++ -fsyntax-only "$WORK/h.c" || fail "amend.h as C++"

# 2. C misuse tests.
step "C misuse tests: valgrind (no model)"
gcc -std=c11 -Wall -Wextra -Werror -O1 -g -Iinclude ffi/tests/c/misuse.c "$LIBA" $libs -o "$WORK/misuse"
valgrind -q --error-exitcode=9 --leak-check=full --errors-for-leak-kinds=definite,indirect \
  "$WORK/misuse"
step "C misuse tests: AddressSanitizer + UBSan (with model)"
gcc -std=c11 -Wall -Wextra -Werror -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer \
  -fno-sanitize-recover=all -Iinclude ffi/tests/c/misuse.c "$LIBA" $libs -o "$WORK/misuse-asan"
margs=(); [ $have_model = 1 ] && margs=("$MODEL" "$WORK/bundles")
ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 "$WORK/misuse-asan" "${margs[@]}"

if [ $have_model = 1 ]; then
  step "C streaming verifier (amend_verify_stream_*): AddressSanitizer + UBSan"
  gcc -std=c11 -Wall -Wextra -Werror -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer \
    -fno-sanitize-recover=all -Iinclude ffi/tests/c/verify_stream.c "$LIBA" $libs -o "$WORK/verify-stream"
  "$WORK/verify-stream" "$WORK/bundles"
fi

# 3. Install into a prefix and build the example through pkg-config and CMake.
step "install + C example (pkg-config, CMake)"
AMEND_NO_BUILD=1 ffi/install.sh "$WORK/prefix"
export PKG_CONFIG_PATH="$WORK/prefix/lib/pkgconfig"
static_pc=$(sed -n 's/^Libs: ${libdir}\/libamend.a //p' ffi/pkgconfig/amend-static.pc.in)
[ "$static_pc" = "$pinned" ] || fail "amend-static.pc.in libs '$static_pc' differ from '$pinned'"
# shellcheck disable=SC2046
gcc -std=c11 -Wall -Wextra -Werror examples/c/amend_demo.c \
  $(pkg-config --cflags --libs amend-static) -o "$WORK/amend_demo"
# The static example must not need libamend.so at run time.
deps=$(ldd "$WORK/amend_demo")
! echo "$deps" | grep -q libamend || fail "amend_demo links libamend.so"
# shellcheck disable=SC2046
gcc -std=c11 -Wall -Wextra -Werror examples/c/amend_demo.c \
  $(pkg-config --cflags --libs amend) -o "$WORK/amend_demo_shared"
msg=$(LD_LIBRARY_PATH="$WORK/prefix/lib" "$WORK/amend_demo_shared" --model /nonexistent.gguf 2>&1 || true)
echo "$msg" | grep -q "AMEND_ERR_IO: amend_model_open: model file not found" \
  || fail "shared example: expected AMEND_ERR_IO for a missing model, got: $msg"
cmake -S examples/c -B "$WORK/cmake-build" -DCMAKE_PREFIX_PATH="$WORK/prefix" >/dev/null
cmake --build "$WORK/cmake-build" >/dev/null
[ -x "$WORK/cmake-build/amend_demo" ] || fail "CMake build of the example"
if [ $have_model = 1 ]; then
  # Same tokens as the Rust API for the same seed (sampled, so the seed matters), without and
  # with a bundle applied (a low-rank delta that changes the output).
  step "C example vs the Rust API (seed 42, temperature 0.8; then greedy with lora.amend)"
  want=$("$AMEND_REFERENCE_BIN" --model "$MODEL" --tokens 12 --seed 42 --temperature 0.8)
  demo_out=$("$WORK/amend_demo" --model "$MODEL" --tokens 12 --seed 42 --temperature 0.8 --ids)
  echo "$demo_out"
  got=$(echo "$demo_out" | sed -n 's/^before ids: //p')
  [ -n "$want" ] && [ "$got" = "$want" ] || fail "C example tokens '$got' != Rust API tokens '$want'"
  want_base=$("$AMEND_REFERENCE_BIN" --model "$MODEL" --tokens 12)
  want_edit=$("$AMEND_REFERENCE_BIN" --model "$MODEL" --tokens 12 --bundle "$WORK/bundles/lora.amend" \
    --key "$WORK/bundles/key.raw")
  demo_out=$("$WORK/amend_demo" --model "$MODEL" --tokens 12 --ids --bundle "$WORK/bundles/lora.amend" \
    --key "$(cat "$WORK/bundles/key.pub")")
  echo "$demo_out"
  got_base=$(echo "$demo_out" | sed -n 's/^before ids: //p')
  got_edit=$(echo "$demo_out" | sed -n 's/^after  ids: //p')
  got_back=$(echo "$demo_out" | sed -n 's/^rolled back ids: //p')
  [ "$got_base" = "$want_base" ] || fail "C example base tokens '$got_base' != Rust '$want_base'"
  [ -n "$want_edit" ] && [ "$got_edit" = "$want_edit" ] || fail "C example tokens with the bundle '$got_edit' != Rust '$want_edit'"
  [ "$want_edit" != "$want_base" ] || fail "lora.amend did not change the Rust API's tokens"
  [ "$got_back" = "$want_base" ] || fail "C example after rollback '$got_back' != base '$want_base'"
  echo "C example == Rust API, without and with the bundle"
fi

# 4. Bindings.
for t in bindings/python/test.sh bindings/java/test.sh bindings/swift/test.sh; do
  if [ -f "$t" ]; then
    step "$t"
    AMEND_LIBRARY="$LIBSO" bash "$t"
  fi
done
step "ok"
