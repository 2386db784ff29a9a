#!/usr/bin/env bash
# A/B of two builds of the radix-tree middleware on the same workload: per-request middleware
# cost (router hook timers, tokenizer time excluded; see bench/radix_cost.py) with a 1k- and a
# 32k-token cached trajectory, and with 4 MB routed_experts answers. Rounds alternate A and B.
#
#   bench/radix_ab.sh A.wasm B.wasm [ROUNDS] [SECONDS]
#   CASES="32000:0" bench/radix_ab.sh ...   # only some cases (TOKENS:EXPERTS_BYTES)
#
# Needs target/release/{slime-router,mock-worker} (cargo build --release --bins) and wrk.
set -euo pipefail
cd "$(dirname "$0")/.."
A=$1 B=$2 ROUNDS=${3:-3} SECONDS_EACH=${4:-5}
TOKENIZER=tests/fixtures/tokenizer.json
PORT=${PORT_BASE:-28700}
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

wait_ready() { for _ in $(seq 200); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.05; done; return 1; }

# measure LABEL WASM TOKENS EXPERTS_BYTES
measure() {
    local worker=$((PORT + 1)) router=$PORT
    target/release/mock-worker --port "$worker" --tokenizer "$TOKENIZER" \
        --routed-experts-bytes "$4" >/dev/null 2>&1 &
    pids+=($!)
    target/release/slime-router --sglang-router-port "$router" \
        --worker-urls "http://127.0.0.1:$worker" --hf-checkpoint "$TOKENIZER" \
        --slime-router-middleware-paths "$2" --log-level warn >/dev/null 2>&1 &
    pids+=($!)
    wait_ready "http://127.0.0.1:$router/list_workers"
    printf '%s\ttokens=%s\texperts=%s\t' "$1" "$3" "$4"
    python3 bench/radix_cost.py "http://127.0.0.1:$router" "$3" "$SECONDS_EACH"
    kill "${pids[@]}"; wait 2>/dev/null || true; pids=()
}

for round in $(seq "$ROUNDS"); do
    for case in ${CASES:-1000:0 32000:0 1000:4000000}; do
        set -- ${case/:/ }
        measure "A(round $round)" "$A" "$1" "$2"
        measure "B(round $round)" "$B" "$1" "$2"
    done
done
