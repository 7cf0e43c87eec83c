#!/usr/bin/env bash
# aarch64 (issue 15): cross-build for aarch64-unknown-linux-gnu and run the edits tests, the
# tiny-model runtime tests and the gemma3 C example under qemu-aarch64, against x86-64
# (scripts/test-aarch64.sh; installs the cross compilers, qemu-user and the Rust target only
# when missing). Cost on 2 cores: ~10 min cold (the cross build; docs/targets.md), ~1.5 min warm.
set -euo pipefail
cd "$(dirname "$0")/../.."
AMEND_REQUIRE_MODEL=1 exec scripts/test-aarch64.sh
