#!/usr/bin/env bash
# Runs every test: the router's unit and integration tests (which build the guest
# components), then the radix-tree cache's own unit and property tests (native).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --release "$@"
cargo test --release --manifest-path middleware-examples/Cargo.toml -p radix-tree
