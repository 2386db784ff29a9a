#!/usr/bin/env python3
"""The rollout benchmark: a slime-shaped multi-turn GRPO rollout (examples/rollout.rs) through
each routing setup, in front of fresh mock workers that simulate a prefix KV cache (their
--kv-* cost model, in simulated time), one setup after the other in one run.

Setups: slime-router least in flight (no key, per-sample keys), slime-router cache_aware (no
key, per-sample keys), and SGLang's router 0.3.2 with round_robin, cache_aware and manual
(its sticky-key policy, per-sample keys). Prints one markdown table, also written to
bench/out/rollout.md, and raw results to bench/out/rollout.jsonl.

usage: bench/rollout.py [--quick] [--no-build] [--no-sglang] [--only a,b] [--groups N] ...
"""
import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
VENV = OUT / "venv"

SETUPS = [
    # key, label, router, router args, client key mode
    ("lif", "slime-router least in flight, no key", "slime", ["--policy", "least_in_flight"], "none"),
    ("lif-keys", "slime-router least in flight, per-sample keys", "slime", ["--policy", "least_in_flight"], "sample"),
    ("ca", "slime-router cache_aware, no key", "slime", ["--policy", "cache_aware"], "none"),
    ("ca-keys", "slime-router cache_aware, per-sample keys", "slime", ["--policy", "cache_aware"], "sample"),
    ("sg-rr", "SGLang router round_robin", "sglang", ["--policy", "round_robin"], "none"),
    ("sg-ca", "SGLang router cache_aware", "sglang", ["--policy", "cache_aware"], "none"),
    ("sg-manual", "SGLang router manual, per-sample keys", "sglang", ["--policy", "manual"], "sample"),
]


def log(*args):
    print(f"[rollout {time.strftime('%H:%M:%S')}]", *args, file=sys.stderr, flush=True)


def free_port(start=[28900]):
    while True:
        port = start[0]
        start[0] += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue


def wait_until(check, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready after {timeout}s")


def get_json(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def sglang_python(install):
    python = VENV / "bin" / "python"
    probe = [str(python), "-c", "import sglang_router"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return str(python)
    if not install:
        return None
    log("installing sglang-router==0.3.2 into bench/out/venv")
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "sglang-router==0.3.2"], check=True)
    return str(python)


class Run:
    """One setup: its processes, stopped on exit."""

    def __init__(self, logs):
        self.procs, self.logs = [], logs

    def start(self, name, argv):
        log_file = open(self.logs / f"rollout-{name}.log", "w")
        self.procs.append(subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT))

    def stop(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def run_setup(setup, opts, python):
    key, label, router, router_args, key_mode = setup
    run = Run(OUT / "logs")
    try:
        workers = []
        for i in range(opts.workers):
            port = free_port()
            workers.append(f"http://127.0.0.1:{port}")
            run.start(f"{key}-worker{i}", [
                str(ROOT / "target/release/mock-worker"), "--port", str(port),
                "--kv-capacity-tokens", str(opts.kv_capacity), "--prefill-us-per-token", str(opts.prefill_us),
                "--decode-ms-per-step", str(opts.decode_ms), "--decode-ms-per-request", str(opts.decode_ms_per_request),
                "--max-running", str(opts.max_running)])
        for w in workers:
            wait_until(lambda: get_json(w + "/health") is not None, 20, w)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        if router == "slime":
            run.start(key, [str(ROOT / "target/release/slime-router"), "--sglang-router-port", str(port),
                            "--worker-urls", *workers, "--log-level", "warn", *router_args, *shlex.split(opts.slime_args)])
            wait_until(lambda: len(get_json(base + "/workers")["workers"]) == len(workers), 30, label)
        else:
            prom = free_port()
            run.start(key, [python, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
                            "--worker-urls", *workers, "--log-level", "warn", "--prometheus-host", "127.0.0.1",
                            "--prometheus-port", str(prom), *router_args])
            wait_until(lambda: sum(1 for w in get_json(base + "/workers")["workers"] if w.get("is_healthy"))
                       == len(workers), 60, label)
        log(f"{label}: rollout of {opts.groups}x{opts.samples}x{opts.turns}")
        client = [str(ROOT / "target/release/examples/rollout"), "--router", base, "--workers", *workers,
                  "--key", key_mode, "--groups", str(opts.groups), "--samples", str(opts.samples),
                  "--turns", str(opts.turns), "--prompt-tokens", str(opts.prompt_tokens),
                  "--tool-tokens", str(opts.tool_tokens)]
        out = subprocess.run(client, capture_output=True, text=True, timeout=3600)
        if out.returncode != 0:
            raise RuntimeError(f"rollout client failed: {out.stderr.strip()[-400:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result.update(setup=key, label=label)
        return result
    finally:
        run.stop()


def table(results):
    by = {r["setup"]: r for r in results if "makespan_s" in r}
    ref, lif = by.get("sg-ca"), by.get("lif")
    lines = ["| setup | makespan s | x SGLang cache_aware | x least in flight | trajectory p50 s | p90 s | "
             "prefill tokens | cache hit | load imbalance |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "makespan_s" not in r:
            lines.append(f"| {r['label']} | n/a: {r['error']} | | | | | | | |")
            continue
        ratio = lambda base: f"{r['makespan_s'] / base['makespan_s']:.2f}" if base else "n/a"
        lines.append(
            f"| {r['label']} | {r['makespan_s']:.1f} | {ratio(ref)} | {ratio(lif)} | {r['trajectory_p50_s']:.1f} | "
            f"{r['trajectory_p90_s']:.1f} | {r['prefill_tokens']:,} | {r['cache_hit_ratio']:.1%} | "
            f"{r['load_imbalance']:.2f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="16 prompts x 8 samples x 3 turns")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--no-sglang", action="store_true", help="skip (and do not install) SGLang's router")
    ap.add_argument("--only", default="", help="comma-separated setups: " + ",".join(s[0] for s in SETUPS))
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--groups", type=int, default=64)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--tool-tokens", type=int, default=512)
    ap.add_argument("--kv-capacity", type=int, default=200_000, help="KV cache tokens per worker")
    ap.add_argument("--prefill-us", type=float, default=100.0, help="prefill microseconds per uncached token")
    ap.add_argument("--decode-ms", type=float, default=15.0, help="milliseconds per decode step...")
    ap.add_argument("--decode-ms-per-request", type=float, default=0.15, help="...plus this per running request")
    ap.add_argument("--max-running", type=int, default=128)
    ap.add_argument("--slime-args", default="", help="extra slime-router flags for its setups, e.g. "
                    "'--balance-abs-threshold 8'")
    opts = ap.parse_args()
    if opts.quick:
        opts.groups, opts.turns = 16, 3
    (OUT / "logs").mkdir(parents=True, exist_ok=True)
    if not opts.no_build:
        log("cargo build --release --bins --example rollout")
        subprocess.run(["cargo", "build", "--release", "--bins", "--example", "rollout"], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
    wanted = [s for s in SETUPS if not opts.only or s[0] in opts.only.split(",")]
    python = None
    if any(s[2] == "sglang" for s in wanted) and not opts.no_sglang:
        try:
            python = sglang_python(install=True)
        except subprocess.CalledProcessError as e:
            log(f"sglang-router unavailable: {e}")
    results = []
    for setup in wanted:
        if setup[2] == "sglang" and not python:
            results.append({"setup": setup[0], "label": setup[1], "error": "sglang-router not installed"})
            continue
        try:
            results.append(run_setup(setup, opts, python))
            r = results[-1]
            log(f"  makespan {r['makespan_s']:.1f} s, p90 {r['trajectory_p90_s']:.1f} s, "
                f"prefill {r['prefill_tokens']:,}, hit {r['cache_hit_ratio']:.1%}, imbalance {r['load_imbalance']:.2f}")
        except Exception as e:  # one setup failing must not lose the others
            log(f"  {setup[1]} failed: {e}")
            results.append({"setup": setup[0], "label": setup[1], "error": str(e)[:200]})
    header = (f"{opts.groups} prompts x {opts.samples} samples x {opts.turns} turns, {opts.workers} mock workers "
              f"(KV cache {opts.kv_capacity:,} tokens, prefill {opts.prefill_us} us/token, decode step "
              f"{opts.decode_ms} ms + {opts.decode_ms_per_request} ms per running request, at most "
              f"{opts.max_running} running), prompt {opts.prompt_tokens} + tool "
              f"{opts.tool_tokens} tokens per turn, outputs 32-96 tokens")
    report = f"{header}\n\n{table(results)}\n"
    (OUT / "rollout.md").write_text(report)
    with open(OUT / "rollout.jsonl", "w") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    print(report)


if __name__ == "__main__":
    main()
