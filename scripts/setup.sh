#!/usr/bin/env bash
# Installs what building slime-router needs beyond the Rust toolchain: a working /dev/null and
# the wasm32-wasip2 target the middleware components are compiled for.
set -euo pipefail

# Some sandboxes leave /dev/null as a regular file that collects whatever is "discarded". Cargo
# feeds /dev/null to rustc as source when it probes a target, so the guest build (run midway
# through the router's build, after C compiler probes wrote there) fails on that garbage.
if [ ! -c /dev/null ]; then
    echo "setup: /dev/null is not a character device; recreating it" >&2
    if mknod -m 666 /dev/null.slime-router c 1 3 2>/dev/null; then
        mv -f /dev/null.slime-router /dev/null
    else
        # No permission to make devices: at least start the build with it empty.
        echo "setup: cannot create /dev/null (not root?); emptying it instead" >&2
        : 2>/dev/null >/dev/null || true
    fi
fi

# grep without -q reads all its input, so rustup never sees a broken pipe under pipefail.
if ! rustup target list --installed | grep -x wasm32-wasip2 >/dev/null; then
    echo "setup: installing the wasm32-wasip2 target" >&2
    rustup target add wasm32-wasip2
fi

# The wheel is built with maturin from a venv, and mock-worker is stripped before packing.
missing=()
python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
command -v strip >/dev/null || missing+=(binutils)
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    apt-get update -qq && apt-get install -y -qq "${missing[@]}"
fi
