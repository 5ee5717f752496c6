#!/usr/bin/env bash
# Time until every node of a local swarm (N = 2, 5, 10 processes on 127.0.0.1)
# sees every other, and advert bytes per node per minute.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p commons-node --bin commons -p commons-benches --bin swarm-join
COMMONS_BIN="$PWD/target/release/commons" exec target/release/swarm-join "$@"
