#!/usr/bin/env python3
"""Per-request cost of the radix-tree middleware on /generate with text, at a given cached
trajectory length, read from the router's own timers: the on-request and on-response hooks
(guest call + applying its patch) minus the time spent tokenising (the uncached tail, which the
worker would otherwise tokenise itself).

Turn 1 caches a long prompt and its output; then one turn-2 body (that whole conversation plus
a short new user message, as multi-turn rollouts send) is replayed by wrk on one connection,
so the calls never queue behind each other.

usage: bench/radix_cost.py ROUTER_URL TOKENS [SECONDS]
(ROUTER_URL: a slime-router with radix_tree.wasm and --hf-checkpoint in front of a worker)
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.request

WORDS = ("the quick brown fox jumps over the lazy dog and keeps running far away from "
         "the dog while we compute the sum step by step ").split()
HOOKS = ("on-request", "on-response")


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req) as resp:
        return json.loads(resp.read())


def timers(base):
    text = urllib.request.urlopen(base + "/metrics").read().decode()

    def value(name):
        match = re.search(re.escape(name) + r" (\S+)", text)
        return float(match.group(1)) if match else 0.0

    out = {}
    for hook in HOOKS:
        labels = f'{{middleware="radix-tree",hook="{hook}"}}'
        out[hook] = (value("slime_router_middleware_hook_duration_seconds_sum" + labels),
                     value("slime_router_middleware_hook_duration_seconds_count" + labels))
    out["tokenizer"] = value('slime_router_tokenizer_seconds_total{middleware="radix-tree"}')
    return out


def main():
    base, tokens = sys.argv[1].rstrip("/"), int(sys.argv[2])
    seconds = sys.argv[3] if len(sys.argv) > 3 else "5"
    words = " ".join(WORDS[i % len(WORDS)] for i in range(tokens))
    prompt = f"<|im_start|>user\n{tokens} {words}<|im_end|>\n<|im_start|>assistant\n"
    first = post(base + "/generate", {"text": prompt, "sampling_params": {"max_new_tokens": 16}, "return_logprob": True})
    history = prompt + first["text"]
    cached = post(base + "/retrieve_from_text", {"text": history})["token_length"]
    turn = history + "<|im_end|>\n<|im_start|>user\nand then?<|im_end|>\n<|im_start|>assistant\n"
    body = {"text": turn, "sampling_params": {"max_new_tokens": 16}, "return_logprob": True}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(body, f)
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "generate.lua")
    before = timers(base)
    env = dict(os.environ, BENCH_BODY_FILE=f.name)
    subprocess.run(["wrk", "-t1", "-c1", f"-d{seconds}s", "-s", script, base + "/generate"],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    after = timers(base)
    os.unlink(f.name)
    calls = after["on-request"][1] - before["on-request"][1]
    hooks = {h: 1e6 * (after[h][0] - before[h][0]) / max(calls, 1) for h in HOOKS}
    tokenizer = 1e6 * (after["tokenizer"] - before["tokenizer"]) / max(calls, 1)
    total = sum(hooks.values())
    print(f"cached prefix {cached} tokens, {int(calls)} requests: "
          f"on-request {hooks['on-request']:.1f} us + on-response {hooks['on-response']:.1f} us "
          f"= {total:.1f} us, of which tokenizer {tokenizer:.1f} us -> middleware cost {total - tokenizer:.1f} us")


if __name__ == "__main__":
    main()
