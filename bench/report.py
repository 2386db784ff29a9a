#!/usr/bin/env python3
"""Turns the harness's raw measurements (bench/out/raw.jsonl, chaos.json, meta.json) into the
markdown report printed by bench/run.sh and written to bench/out/results.md.

Usage: report.py OUT_DIR
"""

import json
import statistics
import sys
from pathlib import Path

# Each table: which targets it holds (in order), which of them are the ratio baselines, and
# which one is "direct" (no proxy) for the added-latency column.
GROUPS = {
    "static": {
        "title": "Static workers (nginx `return 200` JSON), POST /generate with input_ids",
        "order": ["direct", "nginx", "sglang", "slime", "slime-1t", "slime-noop", "slime-noop3",
                  "slime-pd"],
        "direct": "direct",
        "baselines": [
            ("nginx", "x nginx least_conn"),
            ("sglang", "x SGLang router"),
            ("slime", "x slime-router"),
        ],
    },
    "mock": {
        "title": "mock-worker with a real tokenizer, POST /generate with text",
        "order": ["mock-direct", "mock-slime", "mock-radix"],
        "direct": "mock-direct",
        "baselines": [("mock-slime", "x slime-router (no middleware)")],
    },
}


def load_jsonl(path):
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rps_of(run):
    return run["requests"] / (run["duration_us"] / 1e6)


def aggregate(runs):
    """Best of the rounds: the one with the most requests/s, whose latency, CPU and RSS are
    reported. Other jobs on a shared machine only ever slow a run down, so the best round is
    the least disturbed one. Errors are summed over all rounds."""
    best = max(runs, key=rps_of)
    cpu = None
    if best.get("cpu_ticks") is not None and best["requests"] > 0:
        cpu = best["cpu_ticks"] / best["clk_tck"] / best["requests"] * 10_000
    return {
        "rps": rps_of(best),
        "p50_ms": best["p50_us"] / 1000,
        "p99_ms": best["p99_us"] / 1000,
        "errors": sum(
            r["non2xx"] + r["connect_errors"] + r["read_errors"] + r["write_errors"] + r["timeouts"]
            for r in runs
        ),
        "cpu_per_10k": cpu,
        "rss_mib": best["rss_kb"] / 1024 if best.get("rss_kb") else None,
        "spread": (max(rps_of(r) for r in runs) / min(rps_of(r) for r in runs) - 1)
        if len(runs) > 1 and min(rps_of(r) for r in runs) > 0 else None,
    }


def fmt(value, spec):
    return "n/a" if value is None else format(value, spec)


def group_table(name, spec, records):
    """Markdown lines for one group, and a dict of its aggregated cells for the summary."""
    order, labels, missing = [], {}, {}
    runs = {}
    for r in records:
        if r["group"] != name:
            continue
        if r["target"] not in labels:
            order.append(r["target"])
            labels[r["target"]] = r["label"]
        if "unavailable" in r:
            missing[r["target"]] = r["unavailable"]
            continue
        runs.setdefault((r["target"], r["conc"]), []).append(r)
    if not order:
        return [], {}
    rank = {t: i for i, t in enumerate(spec["order"])}
    order.sort(key=lambda t: rank.get(t, len(rank)))
    cells = {key: aggregate(v) for key, v in runs.items()}
    concs = sorted({c for (_, c) in cells})
    header = ["target", "c", "req/s", "p50 ms", "p99 ms"]
    header += [label for _, label in spec["baselines"]]
    header += ["+p50 vs direct ms", "errors", "CPU s / 10k req", "RSS MiB", "round spread"]
    lines = [f"### {spec['title']}", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    for target in order:
        if target in missing:
            row = [labels[target], "-", "unavailable: " + missing[target].replace("|", "\\|")]
            row += [""] * (len(header) - len(row))
            lines.append("| " + " | ".join(row) + " |")
            continue
        for conc in concs:
            cell = cells.get((target, conc))
            if cell is None:
                continue
            row = [labels[target], str(conc), fmt(cell["rps"], ",.0f"),
                   fmt(cell["p50_ms"], ".3f"), fmt(cell["p99_ms"], ".3f")]
            for base, _ in spec["baselines"]:
                ref = cells.get((base, conc))
                row.append("n/a" if ref is None or ref["rps"] == 0
                           else f"{cell['rps'] / ref['rps']:.2f}")
            direct = cells.get((spec["direct"], conc))
            if target == spec["direct"] or direct is None:
                row.append("-")
            else:
                row.append(f"{cell['p50_ms'] - direct['p50_ms']:+.3f}")
            row += [str(cell["errors"]),
                    "-" if target == spec["direct"] else fmt(cell["cpu_per_10k"], ".3f"),
                    "-" if target == spec["direct"] else fmt(cell["rss_mib"], ".1f"),
                    "-" if cell["spread"] is None else f"{cell['spread'] * 100:.0f}%"]
            lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    return lines, cells


def chaos_lines(chaos):
    if not chaos:
        return []
    if "unavailable" in chaos:
        return ["### Chaos", "", f"not run: {chaos['unavailable']}", ""]
    w = chaos["wrk"]
    lost = w["connect_errors"] + w["read_errors"] + w["write_errors"] + w["timeouts"]
    in_flight = chaos.get("in_flight", {})
    total_in_flight = sum(in_flight.values()) if in_flight else None
    ok = w["non2xx"] == 0 and lost == 0 and total_in_flight == 0
    lines = [
        "### Chaos: kill -9 / restart mock workers under load",
        "",
        f"{chaos['workers']} mock workers behind slime-router "
        f"(--rollout-health-check-interval {chaos['health_interval']}), wrk -c{chaos['conc']} "
        f"for {chaos['duration']} s; every {chaos['kill_every']} s one worker is killed with "
        f"SIGKILL and restarted {chaos['restart_after']} s later, cycling (never two down).",
        "",
        "| metric | value |",
        "|---|---|",
        f"| kills / restarts | {chaos['kills']} / {chaos['restarts']} |",
        f"| requests completed | {w['requests']:,} |",
        f"| req/s | {w['requests'] / (w['duration_us'] / 1e6):,.0f} |",
        f"| failed requests (non-2xx) | {w['non2xx']} |",
        f"| lost requests (connect/read/write errors, timeouts) | {lost} "
        f"({w['connect_errors']}/{w['read_errors']}/{w['write_errors']}/{w['timeouts']}) |",
        f"| p50 / p99 / max latency ms | {w['p50_us'] / 1000:.3f} / {w['p99_us'] / 1000:.3f} / "
        f"{w['max_us'] / 1000:.1f} |",
        f"| router retries (worker failures counted) | {chaos.get('router_failures', 'n/a')} |",
        f"| in-flight per worker after the load (GET /workers) | "
        f"{', '.join(f'{k}: {v}' for k, v in in_flight.items()) or 'n/a'} |",
        f"| result | {'PASS' if ok else 'FAIL'} (goal: 0 failed, 0 lost, all in-flight 0) |",
        "",
    ]
    return lines


def summary_lines(cells_by_group):
    out = []
    static = cells_by_group.get("static", {})
    mock = cells_by_group.get("mock", {})

    def ratio(a, b, conc, cells):
        x, y = cells.get((a, conc)), cells.get((b, conc))
        return None if x is None or y is None or y["rps"] == 0 else x["rps"] / y["rps"]

    def added(a, b, conc, cells):
        x, y = cells.get((a, conc)), cells.get((b, conc))
        return None if x is None or y is None else x["p50_ms"] - y["p50_ms"]

    hi = max((c for (_, c) in static), default=None)
    if hi is not None:
        for label, base in (("nginx least_conn", "nginx"), ("SGLang's router", "sglang")):
            r = ratio("slime", base, hi, static)
            if r is not None:
                out.append(f"- slime-router vs {label} at c={hi}: {r:.2f}x requests/s")
        for key, what in (("slime-noop", "one no-op wasm middleware"),
                          ("slime-noop3", "three no-op wasm middlewares")):
            r = ratio(key, "slime", hi, static)
            if r is not None:
                out.append(f"- {what} keep{'s' if key == 'slime-noop' else ''} {r:.2f}x of "
                           f"slime-router's requests/s at c={hi}")
    if 1 in {c for (_, c) in static}:
        a = added("slime", "direct", 1, static)
        b = added("slime-noop", "slime", 1, static)
        b3 = added("slime-noop3", "slime", 1, static)
        if a is not None:
            out.append(f"- slime-router adds {a:.3f} ms p50 over direct at c=1"
                       + (f"; one no-op middleware {b:+.3f} ms more" if b is not None else "")
                       + (f", three {b3:+.3f} ms" if b3 is not None else ""))
    hi = max((c for (_, c) in mock), default=None)
    if hi is not None:
        r = ratio("mock-radix", "mock-slime", hi, mock)
        if r is not None:
            out.append(f"- radix-tree middleware keeps {r:.2f}x of slime-router's requests/s "
                       f"at c={hi} (text requests, mock workers)")
        b = added("mock-radix", "mock-slime", 1, mock)
        if b is not None:
            out.append(f"- radix-tree middleware adds {b:+.3f} ms p50 at c=1")
    if out:
        out = ["### Summary", ""] + out + [""]
    return out


# Issue 14's table: (what, group, target, baseline, goal). The ratio is taken in each round
# between two measurements made minutes apart at most, then summarised; a goal holds only if
# it holds in every round.
RATIO_TARGETS = [
    ("slime-router / nginx least_conn", "static", "slime", "nginx", 1.0),
    ("slime-router / SGLang's router", "static", "slime", "sglang", 3.9),
    ("one no-op middleware / none", "static", "slime-noop", "slime", 0.95),
    ("radix middleware on text / same text without middleware", "mock", "mock-radix",
     "mock-slime", 0.85),
    ("slime-router 1 serving thread / 2 threads", "static", "slime-1t", "slime", None),
]


def per_round(records, group, conc, value):
    """{round: {target: value(run)}} for one group and concurrency."""
    rounds = {}
    for r in records:
        if r["group"] == group and r.get("conc") == conc and "unavailable" not in r:
            rounds.setdefault(r["round"], {})[r["target"]] = value(r)
    return rounds


def spread_text(values, spec, unit=""):
    values = sorted(values)
    body = f"{format(statistics.median(values), spec)}{unit}"
    if len(values) > 1:
        body += f" ({format(values[0], spec)}{unit} to {format(values[-1], spec)}{unit})"
    return body


def targets_lines(records, idle):
    concs = sorted({r["conc"] for r in records if "conc" in r})
    if not concs:
        return []
    hi = concs[-1]
    lines = ["### Targets (issue 14)", "",
             f"Per-round ratios at c={hi}: median (lowest to highest round); "
             "met only if every round meets it.", "",
             "| what | measured | rounds | target | met |", "|---|---|---|---|---|"]
    for what, group, target, base, goal in RATIO_TARGETS:
        rounds = per_round(records, group, hi, rps_of)
        ratios = [v[target] / v[base] for v in rounds.values()
                  if target in v and base in v and v[base] > 0]
        if not ratios:
            continue
        met = "-" if goal is None else ("yes" if min(ratios) >= goal else "no")
        goal_text = "(read)" if goal is None else f">= {goal:.2f}x"
        lines.append(f"| {what} | {spread_text(ratios, '.2f', 'x')} | {len(ratios)} | "
                     f"{goal_text} | {met} |")
    p50 = per_round(records, "static", 1, lambda r: r["p50_us"] / 1000)
    pairs = [(v["slime"] - v["direct"], v["nginx"] - v["direct"]) for v in p50.values()
             if {"slime", "nginx", "direct"} <= v.keys()]
    if pairs:
        ours, theirs = [a for a, _ in pairs], [b for _, b in pairs]
        met = "yes" if all(a <= b for a, b in pairs) else "no"
        lines.append(f"| added p50 over direct at c=1 | {spread_text(ours, '+.3f', ' ms')} | "
                     f"{len(pairs)} | <= nginx's {spread_text(theirs, '+.3f', ' ms')} | {met} |")
    rss = idle.get("mock-radix")
    if rss is not None:
        mib = rss / 1024
        lines.append(f"| idle RSS with the radix cache loaded | {mib:.1f} MiB | 1 | <= 30 MiB | "
                     f"{'yes' if mib <= 30 else 'no'} |")
    return lines + [""]


def load_range(records):
    loads = [r["load1"] for r in records if r.get("load1") is not None]
    return f"{min(loads):.1f} to {max(loads):.1f}" if loads else "n/a"


def main():
    out = Path(sys.argv[1])
    meta = json.loads((out / "meta.json").read_text())
    records = load_jsonl(out / "raw.jsonl")
    chaos_path = out / "chaos.json"
    chaos = json.loads(chaos_path.read_text()) if chaos_path.exists() else None
    idle = {r["target"]: r["idle_rss_kb"] for r in load_jsonl(out / "idle.jsonl")}

    lines = [
        "# slime-router benchmark",
        "",
        f"- date: {meta['date']}",
        f"- machine: {meta['nproc']} cores ({meta['cpu']}), {meta['mem']} memory, "
        f"{meta['kernel']}",
        f"- slime-router: {meta['git']}; wrk {meta['wrk']}; nginx {meta['nginx']}; "
        f"sglang-router {meta['sglang']}",
        f"- load: wrk POST /generate, {meta['duration']} s per measurement after a "
        f"{meta['warmup']} s warm-up, "
        f"{'best of %d interleaved rounds' % meta['rounds'] if meta['rounds'] > 1 else 'one round'}, "
        f"concurrency "
        f"{', '.join(meta['concurrency'])}, wrk -t{meta.get('wrk_threads', 1)}; everything on 127.0.0.1, "
        f"load generator on the same {meta['nproc']} cores",
        f"- {meta['workers']} workers per target; {meta['proxy_procs']}",
        f"- 1-minute load average after each measurement: {load_range(records)} "
        "(the benchmark itself accounts for about 2-3; more means other jobs shared the cores)",
        "",
        "Ratios compare requests/s within this run (absolute numbers drift between runs on "
        "a shared machine). Each cell is the best round (most requests/s); `round spread` is "
        "how much faster the best round was than the worst. CPU is the router's user+system "
        "time per 10k requests during that round; RSS is VmRSS right after it (nginx: master + "
        "workers).",
        "",
    ]
    cells_by_group = {}
    body = []
    for name, spec in GROUPS.items():
        table, cells = group_table(name, spec, records)
        body += table
        cells_by_group[name] = cells
    lines += targets_lines(records, idle) + summary_lines(cells_by_group) + body
    lines += chaos_lines(chaos)
    text = "\n".join(lines)
    (out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
