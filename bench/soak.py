#!/usr/bin/env python3
"""Soak test (issue 12): mixed traffic through the router with the radix cache for a while,
a worker killed and restarted every 30 s, a middleware that traps on 1% of requests, clients
that disconnect mid-stream, and slow and idle clients. Reports failed requests while at least
one worker lived (goal 0), in-flight counts afterwards (goal 0), and the router's RSS and open
descriptors at start, middle and end (goal: flat). Exits 1 when a goal is missed.

    cargo build --release --bins && (cd tests/guests && cargo build --release --target wasm32-wasip2)
    bench/soak.py [--duration 600] [--clients 8]

Everything runs on 127.0.0.1. Only a request that was in flight on a worker at the moment it
was killed may fail (it may have run there, so it is never sent again): those are counted
apart, as `cut_by_kill`.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROUTER = ROOT / "target/release/slime-router"
MOCK = ROOT / "target/release/mock-worker"
HOSTILE = ROOT / "tests/guests/target/wasm32-wasip2/release/hostile.wasm"
TOKENIZER = ROOT / "tests/fixtures/tokenizer.json"
KILL_EVERY = 30.0
DOWN_FOR = 3.0
PROMPTS = [
    "<|im_start|>user\nTell me about the fox<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "The quick brown fox jumps over the lazy dog.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Worker:
    """A mock worker process on a fixed port, which the killer stops and starts."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.down_since: float | None = None
        self.kills: list[float] = []
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [str(MOCK), "--port", str(self.port), "--tokenizer", str(TOKENIZER),
             "--tokens-per-second", "400"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        self.down_since = None

    def kill(self) -> None:
        if self.proc is not None:
            self.kills.append(time.monotonic())
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.down_since = time.monotonic()


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.failures: list[tuple[float, str, str]] = []

    def ok(self, kind: str) -> None:
        with self.lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1

    def fail(self, kind: str, why: str) -> None:
        with self.lock:
            self.failures.append((time.monotonic(), kind, why[:200]))


def generate(base: str, stream: bool, cut: bool) -> str | None:
    """One /generate; None when it went as expected, else why not."""
    body = json.dumps({
        "text": random.choice(PROMPTS) + str(random.randrange(50)),
        "stream": stream,
        "return_logprob": True,
        "sampling_params": {"max_new_tokens": random.randrange(4, 32)},
    })  # fmt: skip
    conn = http.client.HTTPConnection(base, timeout=30)
    try:
        conn.request("POST", "/generate", body, {"content-type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            return f"status {response.status}: {response.read()[:120]!r}"
        if cut:
            response.read(64)  # then leave mid-stream
            return None
        data = response.read()
        if stream and not data.rstrip().endswith(b"data: [DONE]"):
            return f"stream ended without [DONE]: {data[-80:]!r}"
        return None
    except (OSError, http.client.HTTPException) as e:
        return f"{type(e).__name__}: {e}"
    finally:
        conn.close()


def slow_client(base: str) -> str | None:
    """Sends its request a few bytes at a time over about a second."""
    host, port = base.split(":")
    body = json.dumps({"text": random.choice(PROMPTS), "sampling_params": {"max_new_tokens": 8}})
    head = f"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
    try:
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(head.encode())
            for i in range(0, len(body), 16):
                s.sendall(body[i:i + 16].encode())
                time.sleep(0.1)
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        return None if answer.startswith(b"HTTP/1.1 200") else f"slow: {answer[:80]!r}"
    except OSError as e:
        return f"slow: {e}"


def idle_client(base: str) -> str | None:
    host, port = base.split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            time.sleep(random.uniform(1, 4))
        return None
    except OSError as e:
        return f"idle: {e}"


def client_loop(base: str, stats: Stats, until: float) -> None:
    kinds = ["plain"] * 40 + ["stream"] * 30 + ["cut"] * 10 + ["slow"] * 10 + ["idle"] * 10
    while time.monotonic() < until:
        kind = random.choice(kinds)
        if kind == "slow":
            why = slow_client(base)
        elif kind == "idle":
            why = idle_client(base)
        else:
            why = generate(base, stream=kind != "plain", cut=kind == "cut")
        if why is None:
            stats.ok(kind)
        else:
            stats.fail(kind, why)


def sample(pid: int) -> dict[str, int]:
    rss = 0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return {"rss_kib": rss, "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def get(base: str, path: str) -> bytes:
    conn = http.client.HTTPConnection(base, timeout=10)
    try:
        conn.request("GET", path)
        return conn.getresponse().read()
    finally:
        conn.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=600.0)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    workers = [Worker(), Worker()]
    port = free_port()
    router = subprocess.Popen([
        str(ROUTER), "--sglang-router-port", str(port),
        "--worker-urls", *[w.url for w in workers],
        "--hf-checkpoint", str(TOKENIZER),
        "--slime-router-middleware-paths", "radix_tree", f"{HOSTILE}?mode=trap&every=100&fail=open",
        "--rollout-health-check-interval", "1", "--slime-router-health-check-failure-threshold", "2",
        "--log-level", "error",
    ])  # fmt: skip
    base = f"127.0.0.1:{port}"
    for _ in range(200):
        try:
            get(base, "/health")
            break
        except OSError:
            time.sleep(0.05)
    stats = Stats()
    started = time.monotonic()
    until = started + args.duration
    samples = {"start": sample(router.pid)}
    threads = [threading.Thread(target=client_loop, args=(base, stats, until)) for _ in range(args.clients)]
    for t in threads:
        t.start()
    victim = 0
    next_kill = started + KILL_EVERY
    middle_at = started + args.duration / 2
    while time.monotonic() < until:
        now = time.monotonic()
        if now >= next_kill:
            workers[victim].kill()
            time.sleep(DOWN_FOR)
            workers[victim].start()
            victim = 1 - victim
            next_kill += KILL_EVERY
        if "middle" not in samples and now >= middle_at:
            samples["middle"] = sample(router.pid)
        time.sleep(0.2)
    for t in threads:
        t.join()
    time.sleep(2)
    samples["end"] = sample(router.pid)
    listed = json.loads(get(base, "/workers"))
    in_flight = sum(w.get("active_requests", 0) for w in listed.get("workers", []))
    metrics = get(base, "/metrics").decode()
    traps = sum(float(l.rsplit(" ", 1)[1]) for l in metrics.splitlines()
                if l.startswith("slime_router_middleware_failures_total") and 'middleware="hostile"' in l)  # fmt: skip
    kills = sorted(t for w in workers for t in w.kills)
    # A request in flight on the killed worker at the moment of the kill may fail: it may have
    # run there, so it is never resent. Anything else failed a request a live worker could serve.
    cut = [f for f in stats.failures if any(0 <= f[0] - k <= 2.0 for k in kills)]
    other = [f for f in stats.failures if f not in cut]
    report = {
        "duration_s": args.duration,
        "clients": args.clients,
        "requests_ok": stats.counts,
        "kills": len(kills),
        "middleware_traps": traps,
        "failed_cut_by_kill": len(cut),
        "cut_by_kill": [f"{f[1]}: {f[2]}" for f in cut[:5]],
        "failed_while_a_worker_lived": len(other),
        "failures": [f"{f[1]}: {f[2]}" for f in other[:10]],
        "in_flight_after": in_flight,
        "router": samples,
    }
    print(json.dumps(report, indent=2))
    router.send_signal(signal.SIGTERM)
    router.wait(30)
    for w in workers:
        w.kill()
    return 0 if not other and in_flight == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
