#!/usr/bin/env bash
# Builds every example middleware into a WebAssembly component and prints their paths.
# wasm32-wasip2 emits components directly, so no wasm-tools step is needed.
# Extra arguments go to cargo, e.g. `./build.sh -p noop`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

# grep without -q reads all its input, so rustup never sees a broken pipe under pipefail.
rustup target list --installed | grep -x wasm32-wasip2 >/dev/null || rustup target add wasm32-wasip2
cargo build --release --target wasm32-wasip2 "$@"

shopt -s nullglob
for wasm in target/wasm32-wasip2/release/*.wasm; do
    echo "$PWD/$wasm"
done
