#!/usr/bin/env python3
"""Scale (issue 12): how long one request takes when every registered worker refuses
connections, so that it must try each of them before it gets its answer. A pick that
rescanned the workers already tried made this cubic in the number of workers (a minute at
10,000); it should grow about linearly.

    cargo build --release --bins
    bench/many_workers.py [--workers 1000 5000 10000] [--router target/release/slime-router]

The workers are ports on 127.0.0.1 from 20000 up (below the ephemeral range) that nothing
listens on; the script checks that each refuses before it starts. The failure threshold is
set above the number of requests, so every request walks every worker.
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import socket
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIRST_PORT = 20000
REQUESTS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def refusing_ports(count: int) -> list[int]:
    ports = []
    port = FIRST_PORT
    while len(ports) < count and port < 32768:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                ports.append(port)
        port += 1
    if len(ports) < count:
        raise SystemExit(f"only {len(ports)} refusing ports below 32768")
    return ports


def request(base: str, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(base, timeout=600)
    try:
        conn.request(method, path, body=body, headers={"content-type": "application/json"})
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def measure(router: str, workers: int) -> dict[str, object]:
    urls = [f"http://127.0.0.1:{p}" for p in refusing_ports(workers)]
    port = free_port()
    proc = subprocess.Popen([
        router, "--sglang-router-port", str(port), "--worker-urls", *urls,
        "--rollout-health-check-interval", "3600",
        "--slime-router-health-check-failure-threshold", "100",
        "--log-level", "error",
    ])  # fmt: skip
    base = f"127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                request(base, "GET", "/health")
                break
            except OSError:
                time.sleep(0.05)
        times, status, error = [], 0, b""
        for _ in range(REQUESTS):
            started = time.monotonic()
            status, error = request(base, "POST", "/generate", b'{"text": "hi"}')
            times.append(time.monotonic() - started)
        return {
            "workers": workers,
            "seconds_per_request": [round(t, 3) for t in times],
            "status": status,
            "error": json.loads(error).get("error"),
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, nargs="+", default=[1000, 5000, 10000])
    parser.add_argument("--router", default=str(ROOT / "target/release/slime-router"))
    args = parser.parse_args()
    for workers in args.workers:
        print(json.dumps(measure(args.router, workers)), flush=True)


if __name__ == "__main__":
    main()
