#!/usr/bin/env bash
# Prints prefill/decode tokens/s of `commons`' executor against candle's
# quantized llama (and llama.cpp's llama-bench when on PATH) on the bundled
# model, matmul GFLOP/s against the machine's peak, and stage vs whole-model
# peak RSS, all measured in one run. Run on a quiet machine.
#
# llama.cpp is optional: build llama-bench from the llama.cpp sources (for
# example the ones inside the llama-cpp-python sdist) and put it on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-model.sh >/dev/null
cargo build --release -p commons-benches --bin executor-ratio
exec target/release/executor-ratio "$@"
