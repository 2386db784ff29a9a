#!/usr/bin/env python3
"""Per-request cost of the radix-tree middleware on /generate with text, at a given cached
trajectory length, read from the router's own hook timers (guest call + applying its patch).

Turn 1 caches a long prompt + output; then many turn-2 requests reuse that whole prefix and
add a short new tail, which is what multi-turn rollouts do. Tokenising the tail is included but
tiny; tokenising turn 1 (the worker would do it anyway) is excluded by resetting the baseline
after it.

usage: bench/radix_cost.py ROUTER_URL TOKENS [REQUESTS]
"""
import json
import re
import sys
import time
import urllib.request

WORDS = ("the quick brown fox jumps over the lazy dog and keeps running far away from "
         "the dog while we compute the sum step by step ").split()


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req) as resp:
        return json.loads(resp.read())


def hook_totals(base):
    text = urllib.request.urlopen(base + "/metrics").read().decode()
    out = {}
    for hook in ("on-request", "on-response"):
        labels = f'middleware="radix-tree",hook="{hook}"'
        s = re.search(r"slime_router_middleware_hook_duration_seconds_sum\{" + re.escape(labels) + r"\} (\S+)", text)
        c = re.search(r"slime_router_middleware_hook_duration_seconds_count\{" + re.escape(labels) + r"\} (\S+)", text)
        out[hook] = (float(s.group(1)) if s else 0.0, float(c.group(1)) if c else 0.0)
    return out


def main():
    base, tokens = sys.argv[1].rstrip("/"), int(sys.argv[2])
    requests = int(sys.argv[3]) if len(sys.argv) > 3 else 200
    words, prompt = 0, []
    # The fixture tokenizer averages roughly one token per word plus its space here.
    while words < tokens:
        prompt.append(WORDS[words % len(WORDS)])
        words += 1
    prompt = "<|im_start|>user\n" + " ".join(prompt) + "<|im_end|>\n<|im_start|>assistant\n"
    first = post(base + "/generate", {"text": prompt, "sampling_params": {"max_new_tokens": 16}, "return_logprob": True})
    history = prompt + first["text"]
    cached = post(base + "/retrieve_from_text", {"text": history})["token_length"]
    before = hook_totals(base)
    started = time.perf_counter()
    for i in range(requests):
        tail = f"<|im_end|>\n<|im_start|>user\nstep {i}<|im_end|>\n<|im_start|>assistant\n"
        post(base + "/generate", {"text": history + tail, "sampling_params": {"max_new_tokens": 4}, "return_logprob": True})
    elapsed = time.perf_counter() - started
    after = hook_totals(base)
    print(f"cached prefix: {cached} tokens; {requests} turn-2 requests in {elapsed:.2f}s")
    for hook in ("on-request", "on-response"):
        total = after[hook][0] - before[hook][0]
        count = after[hook][1] - before[hook][1]
        print(f"  {hook:12s} mean {1e6 * total / max(count, 1):8.1f} us over {int(count)} calls")
    both = sum(after[h][0] - before[h][0] for h in after) / max(after["on-request"][1] - before["on-request"][1], 1)
    print(f"  per request  {1e6 * both:8.1f} us (request + response hooks)")


if __name__ == "__main__":
    main()
