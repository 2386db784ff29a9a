#!/usr/bin/env bash
# Latency of GET /engine_metrics with N mock workers behind the router (each serves an
# SGLang-named /metrics), from wrk on one connection.
#
#   bench/engine_metrics.sh [WORKERS=8] [SECONDS=10]
#
# Needs target/release/{slime-router,mock-worker} (cargo build --release --bins) and wrk.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-8} SECS=${2:-10} PORT=${PORT_BASE:-28800}
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
urls=()
for i in $(seq "$N"); do
    target/release/mock-worker --port $((PORT + i)) >/dev/null 2>&1 &
    pids+=($!)
    urls+=("http://127.0.0.1:$((PORT + i))")
done
target/release/slime-router --sglang-router-port "$PORT" --worker-urls "${urls[@]}" --log-level warn \
    >/dev/null 2>&1 &
pids+=($!)
for _ in $(seq 200); do curl -sf "http://127.0.0.1:$PORT/engine_metrics" >/dev/null 2>&1 && break; sleep 0.05; done
families=$(curl -s "http://127.0.0.1:$PORT/engine_metrics" | grep -c '^# TYPE' || true)
samples=$(curl -s "http://127.0.0.1:$PORT/engine_metrics" | grep -vc '^#' || true)
result=$(BENCH_METHOD=GET wrk -t1 -c1 -d"${SECS}s" -s bench/generate.lua "http://127.0.0.1:$PORT/engine_metrics" |
    grep '^BENCH_RESULT' | cut -d' ' -f2-)
python3 - "$result" "$N" "$families" "$samples" <<'PY'
import json, sys
r, n, families, samples = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
errors = r["non2xx"] + r["connect_errors"] + r["read_errors"] + r["timeouts"]
print(f"/engine_metrics with {n} workers ({families} families, {samples} samples): "
      f"p50 {r['p50_us']/1000:.3f} ms, p90 {r['p90_us']/1000:.3f} ms, p99 {r['p99_us']/1000:.3f} ms, "
      f"{r['requests']} requests, {errors} errors")
PY
