#!/usr/bin/env bash
# Fetches ONNX Runtime for the `ort` backend (issue 13) into $AMEND_CACHE/ort
# (default ~/.cache/amend/ort), only when missing:
#   ort/cpu/        libonnxruntime.so from PyPI `onnxruntime` 1.32.0 (CPU EP)
#   ort/openvino/   libonnxruntime.so + the OpenVINO EP and OpenVINO 2025.4 from PyPI
#                   `onnxruntime-openvino` 1.24.1 (its CPU device is the non-default EP we can test)
# The two cannot share a directory (each wheel ships its own libonnxruntime). The wheels are
# downloaded, never installed, and checked against the sha256 below; only the shared libraries
# and licences are kept. Prints the two library paths.
set -euo pipefail
CACHE="${AMEND_CACHE:-$HOME/.cache/amend}"
ORT="$CACHE/ort"

fetch() { # name version wheel sha256 dir libname
  local name=$1 version=$2 wheel=$3 sha=$4 dir=$5 lib=$6
  if [ -f "$dir/$lib" ] && [ -f "$dir/LICENSE" ] && [ -f "$dir/.wheel-sha256" ] && [ "$(cat "$dir/.wheel-sha256")" = "$sha" ]; then
    echo "$dir/$lib"; return 0
  fi
  local work="$ORT/download"
  mkdir -p "$work"
  if ! echo "$sha  $work/$wheel" | sha256sum --check --status 2>/dev/null; then
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.11 \
      --platform manylinux_2_28_x86_64 --dest "$work" "$name==$version" >&2
    echo "$sha  $work/$wheel" | sha256sum --check --status || {
      echo "fetch-ort: sha256 mismatch for $work/$wheel" >&2; exit 1; }
  fi
  rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
  python3 - "$work/$wheel" "$dir.tmp" <<'PY'
import os, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        base = os.path.basename(info.filename)
        keep = info.filename.startswith("onnxruntime/capi/lib") and ".so" in base
        keep |= info.filename in ("onnxruntime/LICENSE", "onnxruntime/ThirdPartyNotices.txt")
        if keep:
            with open(os.path.join(dest, base), "wb") as f:
                f.write(z.read(info))
PY
  echo "$sha" > "$dir.tmp/.wheel-sha256"
  rm -rf "$dir" && mv "$dir.tmp" "$dir"
  rm -f "$work/$wheel"
  echo "$dir/$lib"
}

case "$(uname -m)-$(uname -s)" in
  x86_64-Linux) ;;
  *) echo "fetch-ort: only x86_64 Linux wheels are fetched here (docs/backends.md lists the others)" >&2; exit 1 ;;
esac
fetch onnxruntime 1.32.0 onnxruntime-1.32.0-cp311-cp311-manylinux_2_28_x86_64.whl \
  5a34fc4dfeb5a7b4a74c95dcba1e773d722abda720b474edf1b0c419dc6d163d \
  "$ORT/cpu" libonnxruntime.so.1.32.0
fetch onnxruntime-openvino 1.24.1 onnxruntime_openvino-1.24.1-cp311-cp311-manylinux_2_28_x86_64.whl \
  3007c803634cc69c6d52af1dea7ce729d9bb62b9a11070fd2f959119199007a8 \
  "$ORT/openvino" libonnxruntime.so.1.24.1
