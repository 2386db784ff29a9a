#!/usr/bin/env bash
# Runs every test: the router's unit and integration tests (which build the guest
# components), the radix-tree cache's and the chat guest's own unit and property tests
# (native), then the wheel: built from the same release binaries, installed into a fresh
# venv, and the Python API's tests run against it. Extra arguments go to the router's `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --release "$@"
cargo test --release --manifest-path middleware-examples/Cargo.toml -p radix-tree -p chat-completions

scripts/build-wheel.sh
VENV=$PWD/target/python/test
rm -rf "$VENV"
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check pytest openai dist/slime_router-*.whl
# From tests/python, so `slime_router` comes from the venv, never from python/ in the tree.
(cd tests/python && "$VENV/bin/python" -m pytest -q)
