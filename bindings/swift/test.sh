#!/usr/bin/env bash
# No Swift toolchain on these machines: check the Swift code's C calls against amend.h, and
# when swiftc exists, also type-check the package.
set -euo pipefail
cd "$(dirname "$0")"
python3 check_header.py
if command -v swift >/dev/null 2>&1; then
  swift build
fi
