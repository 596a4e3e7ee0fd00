#!/usr/bin/env bash
# Multiplexer comparison for the TLS/TCP transport (docs/decisions.md): both candidates in one
# run, each in its own process so each memory figure is its own.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --example muxbench
for mux in qmux yamux; do
    target/release/examples/muxbench "$mux"
    target/release/examples/muxbench "$mux" --answer
done
