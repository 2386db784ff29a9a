#!/usr/bin/env bash
# Builds the slime_router wheel into dist/: the slime-router and mock-worker executables and
# the `slime_router` Python package, for this machine's platform (linux x86_64 here).
#
#   scripts/build-wheel.sh && pip install dist/slime_router-*.whl
#
# maturin comes from PyPI into a venv under target/ (gitignored). The binaries are the same
# release build the tests and the quick start use, so after them this only packs.
set -euo pipefail
cd "$(dirname "$0")/.."
MATURIN_VERSION=1.16.0
VENV=target/python/build
DATA=target/wheel-data

scripts/setup.sh
if [ "$("$VENV/bin/maturin" --version 2>/dev/null)" != "maturin $MATURIN_VERSION" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "maturin==$MATURIN_VERSION"
fi

# maturin packs the binaries of one crate only; mock-worker is another crate of the
# workspace, so it travels in the wheel's data dir, whose scripts/ pip installs on PATH.
cargo build --release --bins
rm -rf "$DATA"
mkdir -p "$DATA/scripts"
# Stripped: the release profile keeps line tables for backtraces, 5x the size of the code.
strip -o "$DATA/scripts/mock-worker" target/release/mock-worker

rm -f dist/slime_router-*.whl
"$VENV/bin/maturin" build --release --strip --out dist "$@"
ls dist/slime_router-*.whl
