#!/usr/bin/env bash
# Installs what building slime-router needs beyond the Rust toolchain: the wasm32-wasip2
# target the middleware components are compiled for.
set -euo pipefail
# grep without -q reads all its input, so rustup never sees a broken pipe under pipefail.
if ! rustup target list --installed | grep -x wasm32-wasip2 >/dev/null; then
    echo "setup: installing the wasm32-wasip2 target" >&2
    rustup target add wasm32-wasip2
fi
