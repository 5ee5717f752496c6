#!/usr/bin/env bash
# Prints prefill/decode tokens/s of `commons`' executor against candle's
# quantized llama (and llama.cpp's llama-bench when on PATH) on the bundled
# model, matmul GFLOP/s against the machine's peak, and stage vs whole-model
# peak RSS, all measured in one run. Run on a quiet machine.
#
# llama.cpp is optional. To add it, build llama-bench from the llama.cpp
# sources (for example those in the llama-cpp-python 0.3.36 sdist, under
# vendor/llama.cpp) and put its build/bin on PATH:
#   cmake -S vendor/llama.cpp -B build -DCMAKE_BUILD_TYPE=Release \
#     -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF
#   cmake --build build -j --target llama-bench
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-model.sh >/dev/null
cargo build --release -p commons-benches --bin executor-ratio
exec target/release/executor-ratio "$@"
