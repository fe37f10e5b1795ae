#!/usr/bin/env python3
"""Summarise scripts/bench-vs-llama-server.sh rows: medians over rounds, ratios, requirements.

Usage: bench_compare_table.py rows.jsonl  (prints Markdown tables)
"""
import json
import statistics
import sys
from collections import defaultdict


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


def ratio(a, b):
    return None if a is None or not b else a / b


def main(path):
    rows = [json.loads(line) for line in open(path) if line.startswith("{")]
    http = defaultdict(list)
    rss = defaultdict(list)
    ceiling = defaultdict(list)
    for r in rows:
        if r.get("bench") == "http":
            http[(r["model"], r["workload"], r["n"], r["server"])].append(r)
        elif r.get("bench") == "rss":
            rss[(r["model"], r["server"])].append(r["peak_rss_kib"] / 1024)
        elif r.get("bench") == "batched-bench":
            ceiling[(r["model"], "batched-bench")].append(r["gen_tok_s"])
        elif r.get("bench") == "engine" and r.get("n") == 16:
            ceiling[(r["model"], r["mode"])].append(r["tok_s"])

    print("| model | workload | c | Flywheel tok/s | llama-server tok/s | ratio | TTFT p50 F / L ms | ratio | TTFT p95 F / L ms | errors F / L | rounds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    ratios = {}
    keys = sorted({k[:3] for k in http}, key=lambda k: (k[0], ["distinct", "shared", "chat", "long"].index(k[1]) if k[1] in ["distinct", "shared", "chat", "long"] else 9, k[2]))
    for model, workload, c in keys:
        f = http.get((model, workload, c, "flywheel"), [])
        l = http.get((model, workload, c, "llama-server"), [])
        ft, lt = med([r["tok_s"] for r in f]), med([r["tok_s"] for r in l])
        f50, l50 = med([r["ttft_ms"] for r in f]), med([r["ttft_ms"] for r in l])
        f95, l95 = med([r["ttft_p95_ms"] for r in f]), med([r["ttft_p95_ms"] for r in l])
        fe, le = sum(r["errors"] for r in f), sum(r["errors"] for r in l)
        ratios[(model, workload, c)] = (ratio(ft, lt), ratio(f50, l50))
        print(
            f"| {model} | {workload} | {c} | {fmt(ft)} | {fmt(lt)} | {fmt(ratio(ft, lt), 2)} | {fmt(f50, 0)} / {fmt(l50, 0)} | "
            f"{fmt(ratio(f50, l50), 2)} | {fmt(f95, 0)} / {fmt(l95, 0)} | {fe} / {le} | {min(len(f), len(l))} |"
        )
    print()
    print("| model | Flywheel peak RSS MiB | llama-server peak RSS MiB | ratio |")
    print("|---|---|---|---|")
    for model in sorted({k[0] for k in rss}):
        f, l = med(rss.get((model, "flywheel"), [])), med(rss.get((model, "llama-server"), []))
        ratios[(model, "rss")] = ratio(f, l)
        print(f"| {model} | {fmt(f, 0)} | {fmt(l, 0)} | {fmt(ratio(f, l), 2)} |")
    print()
    for model in sorted({k[0] for k in ceiling}):
        b = med(ceiling.get((model, "batched-bench"), []))
        n = med(ceiling.get((model, "native"), []))
        e = med(ceiling.get((model, "engine"), []))
        ratios[(model, "native/ceiling")] = ratio(n, b)
        ratios[(model, "engine/native")] = ratio(e, n)
        print(f"| {model} N=16 64+128 | llama-batched-bench {fmt(b)} tok/s | native loop {fmt(n)} ({fmt(ratio(n, b), 3)}x) | engine {fmt(e)} ({fmt(ratio(e, n), 3)}x native) |")
        print()

    # The requirements, where the rows to check them exist.
    checks = [
        ("smollm2", "distinct", 16, 1.0, 1.0),
        ("smollm2", "shared", 16, 1.3, 0.5),
        ("smollm2", "chat", 16, 1.3, 0.4),
        ("smollm2", "distinct", 1, 1.0, 1.0),
        ("smollm2", "long", 1, 1.0, 1.0),
    ]
    print("Requirements:")
    for model, workload, c, tok, ttft in checks:
        if (model, workload, c) not in ratios:
            continue
        t, p = ratios[(model, workload, c)]
        ok = t is not None and p is not None and t >= tok and p <= ttft
        print(f"  {'PASS' if ok else 'FAIL'} {model} {workload} c={c}: tok/s {fmt(t, 2)}x (need >= {tok}), TTFT p50 {fmt(p, 2)}x (need <= {ttft})")
    for w in ["distinct", "shared"]:
        s, g = ratios.get(("smollm2", w, 16)), ratios.get(("gemma3-270m", w, 16))
        if s and g and s[0] and g[0]:
            ok = abs(s[0] - g[0]) <= 0.05
            print(f"  {'PASS' if ok else 'FAIL'} gemma3-270m {w} c=16 tok/s ratio {g[0]:.2f} within 0.05 of smollm2's {s[0]:.2f}")
    for model in sorted({k[0] for k in rss}):
        r = ratios.get((model, "rss"))
        if r:
            print(f"  {'PASS' if r <= 1.0 else 'FAIL'} {model} peak RSS {r:.2f}x llama-server's (need <= 1.0)")
    for model in sorted({k[0] for k in ceiling}):
        n, e = ratios.get((model, "native/ceiling")), ratios.get((model, "engine/native"))
        if n:
            print(f"  {'PASS' if n >= 0.95 else 'FAIL'} {model} native loop {n:.3f}x llama-batched-bench (need >= 0.95)")
        if e:
            print(f"  {'PASS' if e >= 0.97 else 'FAIL'} {model} engine {e:.3f}x native at N=16 (need >= 0.97)")


if __name__ == "__main__":
    main(sys.argv[1])
