#!/usr/bin/env bash
# Installs the amend C library into PREFIX (default /usr/local): lib/libamend.{a,so},
# include/amend.h, lib/pkgconfig/amend.pc (shared; --static adds what libamend.a needs) and
# amend-static.pc (always the archive), lib/cmake/amend/. Builds the release libraries
# first unless AMEND_NO_BUILD=1. Debug info is stripped from the installed copies.
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX="${1:-/usr/local}"
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
if [ "${AMEND_NO_BUILD:-0}" != 1 ]; then
  cargo build --release -p amend-ffi >&2
fi
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
mkdir -p "$PREFIX/lib/pkgconfig" "$PREFIX/lib/cmake/amend" "$PREFIX/include"
for lib in libamend.a libamend.so; do
  # --strip-debug: the release profile keeps line tables (debug = 1); 450 MB -> ~60 MB.
  strip --strip-debug -o "$PREFIX/lib/$lib.tmp" "$TARGET_DIR/release/$lib"
  mv "$PREFIX/lib/$lib.tmp" "$PREFIX/lib/$lib"
done
cp include/amend.h "$PREFIX/include/amend.h"
for pc in amend amend-static; do
  sed -e "s|@PREFIX@|$PREFIX|" -e "s|@VERSION@|$VERSION|" "ffi/pkgconfig/$pc.pc.in" >"$PREFIX/lib/pkgconfig/$pc.pc"
done
cp ffi/cmake/amendConfig.cmake "$PREFIX/lib/cmake/amend/"
sed -e "s|@VERSION@|$VERSION|" ffi/cmake/amendConfigVersion.cmake.in >"$PREFIX/lib/cmake/amend/amendConfigVersion.cmake"
echo "installed amend $VERSION into $PREFIX" >&2
