# amend: the two commands a fresh machine needs are `make demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
# Where scripts/fetch-*.sh install: their ${AMEND_CACHE:-$HOME/.cache/amend} (an empty AMEND_CACHE
# counts as unset); AMEND_MODEL still overrides the model.
AMEND_CACHE_DIR := $(or $(strip $(AMEND_CACHE)),$(HOME)/.cache/amend)
export AMEND_MODEL ?= $(AMEND_CACHE_DIR)/gemma3-270m-q4_k_m.gguf

.PHONY: setup model corpus ort scope-model scope-head-check build build-cli demo test test-aarch64 test-rust test-fuzz bench fmt clean

setup:
	@scripts/setup-deps.sh

model: setup
	@scripts/fetch-model.sh >/dev/null

# The covariance corpus of rome/memit (WordNet 3.0 from Debian's wordnet-base, ~20 MB).
corpus:
	@scripts/fetch-corpus.sh >/dev/null

# ONNX Runtime for `--backend ort` (CPU build, and the OpenVINO build), ~110 MB of wheels.
ort:
	@scripts/fetch-ort.sh >/dev/null

build: setup
	$(CARGO) build --release --workspace

# What `make demo` needs: the amend binary alone (not the C library, tests or benches).
build-cli: setup
	$(CARGO) build --release -p amend-cli

# The scope model serac's memories route with (needs the amend binary to convert it).
scope-model: build-cli
	@scripts/fetch-scope-model.sh >/dev/null

# Rebuild data/scope-head.safetensors from the recipe it records and compare bytes (~2 min; on a
# CPU like the one that trained it, see the script).
scope-head-check: build-cli scope-model
	@scripts/check-scope-head.sh

demo: model build-cli scope-model
	@scripts/demo.sh

# Real-model tests are mandatory under `make test` (AMEND_REQUIRE_MODEL=1): a missing model fails, never skips.
# One test at a time (RUST_TEST_THREADS=1): two tests' llama.cpp thread pools on the same cores
# spin against each other (docs/runtime.md, Threading); edits_applied took 280 s in parallel, 12 s serially.
test: model scope-model corpus ort
	RUST_TEST_THREADS=1 AMEND_REQUIRE_MODEL=1 $(CARGO) test --release --workspace
	@scripts/test-extra.sh

# aarch64 cross build + qemu tests (issue 15), also run by `make test` (scripts/test.d/aarch64.sh).
test-aarch64: model scope-model
	AMEND_REQUIRE_MODEL=1 scripts/test-aarch64.sh

bench: model
	$(CARGO) bench --workspace

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
