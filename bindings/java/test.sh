#!/usr/bin/env bash
# Builds the JNI shim against libamend (AMEND_LIBRARY, default target/release/libamend.so),
# compiles the Java sources with javac and runs the tests with java.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
LIB=$(realpath "${AMEND_LIBRARY:-$ROOT/target/release/libamend.so}")
[ -z "${AMEND_REFERENCE_BIN:-}" ] || { AMEND_REFERENCE_BIN=$(realpath "$AMEND_REFERENCE_BIN"); export AMEND_REFERENCE_BIN; }
CACHE="${AMEND_CACHE:-$HOME/.cache/amend}"
export AMEND_MODEL="${AMEND_MODEL:-$CACHE/gemma3-270m-q4_k_m.gguf}"
export AMEND_SCOPE_MODEL="${AMEND_SCOPE_MODEL:-$CACHE/all-minilm-l6-v2-q8_0.gguf}"
if [ ! -f "$AMEND_MODEL" ]; then
  [ "${AMEND_REQUIRE_MODEL:-0}" = 1 ] && { echo "java: model missing" >&2; exit 1; }
  echo "java: model $AMEND_MODEL missing: skipped"; exit 0
fi
JAVA_HOME="${JAVA_HOME:-$(dirname "$(dirname "$(readlink -f "$(command -v javac)")")")}"
OUT=$(mktemp -d /tmp/amend-java.XXXXXX)
trap 'rm -rf "$OUT"' EXIT
cd "$(dirname "$0")"
gcc -std=c11 -O2 -Wall -Wextra -Werror -shared -fPIC -I"$JAVA_HOME/include" -I"$JAVA_HOME/include/linux" \
  -I"$ROOT/include" native/amend_jni.c -L"$(dirname "$LIB")" -lamend -Wl,-rpath,"$(dirname "$LIB")" \
  -o "$OUT/libamend_jni.so"
javac -Xlint:all -Werror -d "$OUT/classes" $(find src -name '*.java')
# -Xcheck:jni validates every JNI call of the shim; its warnings fail the test.
java -Xcheck:jni -Damend.jni.library="$OUT/libamend_jni.so" -cp "$OUT/classes" dev.amend.AmendTest 2>&1 \
  | tee "$OUT/java.log"
status=${PIPESTATUS[0]}
if grep -q "WARNING in native method" "$OUT/java.log"; then
  echo "java: FAILED: -Xcheck:jni reported misuse of JNI in amend_jni.c" >&2
  exit 1
fi
exit "$status"
