#!/usr/bin/env bash
# Simulator speed and size: events per second, simulated days per wall minute
# and peak memory for swarms of 10^3 to 10^5 nodes (release build, one thread).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --quiet --release -p commons-sim --example scale
