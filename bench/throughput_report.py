#!/usr/bin/env python3
"""Turns bench/throughput.sh's rows into the throughput table, the plot of tokens/s against sequence
length, and the JSON rows kept in docs/bench.

Usage: throughput_report.py ROWS.jsonl --gpu h200 [--date YYYY-MM-DD] [--docs docs]
Writes DOCS/bench/throughput-<gpu>-<date>.json (a list of row objects: model, seq, tokens_per_s, mfu,
peak_mb, ...), DOCS/bench/throughput-<gpu>-<date>.md (the tables, and which of the performance targets
of docs/PERF.md the rows meet) and DOCS/throughput-<gpu>.png (needs gnuplot), and prints the tables.
"""
import argparse
import datetime
import json
import os
import subprocess
import tempfile

ORDER = ["toy", "toy-parallel", "toy-ssd", "toy-paper", "transformer-toy", "transformer-toy-cudnn", "transformer-toy-ours", "torch-transformer", "torch-transformer-compile", "hydra-1.6b",
         "hydra-1.6b-recompute", "hydra-1.6b-parallel", "hydra-1.6b-ssd"]


def fmt_k(v):
    return "-" if v is None else f"{v / 1e3:,.0f}K"


def targets(by):
    """The performance targets (docs/PERF.md, issue 17) against the rows: (target, value, met) for each
    one whose rows are present. Toy is each of toy-parallel and toy-ssd (the SSD form) where measured,
    else toy; hydra-1.6b each of its 8K rows."""
    def tps(m, s):
        r = by.get((m, s))
        return None if r is None or "error" in r else r["tokens_per_s"]

    toys = [m for m in ("toy-parallel", "toy-ssd") if any(x == m for x, _ in by)] or ["toy"]
    out = []
    for toy in toys:
        for seq, goal in [(2048, 1.0), (8192, 1.5), (32768, 2.5)]:
            # against our fastest Transformer row: as shipped, on cuDNN's faster backward, or on ours
            a = tps(toy, seq)
            bases = [(tps(m, seq), m) for m in ("transformer-toy", "transformer-toy-cudnn", "transformer-toy-ours")
                     if tps(m, seq)]
            if a and bases:
                b, name = max(bases)
                out.append((f"{toy} vs {name} >= {goal}x at {seq // 1024}K", f"{a / b:.2f}x", a / b >= goal))
        flat = [v for (m, s), r in by.items() if m == toy and 512 <= s <= 32768 for v in [tps(m, s)] if v]
        if tps(toy, 512) and tps(toy, 32768):  # the slowest length against the fastest
            drop = 1 - min(flat) / max(flat)
            out.append((f"{toy} within 25% from 512 to 32K", f"{100 * drop:.0f}% apart", drop <= 0.25))
        a, b = tps(toy, 8192), tps("torch-transformer", 8192)
        if a and b:
            out.append((f"{toy} >= 1.3x PyTorch at 8K", f"{a / b:.2f}x", a / b >= 1.3))
    for m in ("hydra-1.6b", "hydra-1.6b-parallel", "hydra-1.6b-ssd"):
        r = by.get((m, 8192))
        if r and "error" not in r and r.get("mfu") is not None:
            out.append((f"{m} >= 35% MFU at 8K (batch {r.get('batch', '?')})", f"{100 * r['mfu']:.1f}%",
                        r["mfu"] >= 0.35))
    r = by.get(("hydra-1.6b-recompute", 8192))
    if r and "error" not in r and r.get("peak_mb"):
        gib = r["peak_mb"] / 1024
        out.append(("hydra-1.6b batch 4 at 8K in 80 GB with recompute", f"{gib:.1f} GiB", gib <= 80))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("rows")
    ap.add_argument("--gpu", required=True)
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    ap.add_argument("--docs", default=os.path.join(os.path.dirname(__file__), "..", "docs"))
    a = ap.parse_args()
    rows = [json.loads(l) for l in open(a.rows) if l.strip()]
    models = sorted({r["model"] for r in rows}, key=lambda m: ORDER.index(m) if m in ORDER else len(ORDER))
    seqs = sorted({r["seq"] for r in rows})
    by = {(r["model"], r["seq"]): r for r in rows}

    out = []
    out.append(f"Training throughput, {a.gpu}, {a.date}: tokens/s (median of the steps after warm-up), "
               "32768 tokens per step, BF16_MIXED, no recomputation unless named.\n")
    out.append("| model | " + " | ".join(f"{s // 1024}K" if s >= 1024 else str(s) for s in seqs) + " |")
    out.append("| --- |" + " ---: |" * len(seqs))
    for m in models:
        cells = []
        for s in seqs:
            r = by.get((m, s))
            cells.append("" if r is None else ("error" if "error" in r else fmt_k(r["tokens_per_s"])))
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    for base in ["transformer-toy", "transformer-toy-cudnn", "transformer-toy-ours", "torch-transformer"]:
        for m in ["toy", "toy-parallel", "toy-ssd", "toy-paper"]:
            if m not in models or base not in models:
                continue
            cells = []
            for s in seqs:
                r, b = by.get((m, s)), by.get((base, s))
                ok = r and b and "error" not in r and "error" not in b
                cells.append(f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}" if ok else "")
            out.append(f"| {m} / {base} | " + " | ".join(cells) + " |")
    out.append("")
    out.append("| model | seq | batch | tokens/s | ms/step | model TFLOP/s | MFU | peak MB |")
    out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for m in models:
        for s in seqs:
            r = by.get((m, s))
            if r is None:
                continue
            if "error" in r:
                out.append(f"| {m} | {s} | {r.get('batch', '')} | error: {r['error'][:120]} | | | | |")
                continue
            mfu = r.get("mfu")
            out.append(f"| {m} | {s} | {r.get('batch', '')} | {r['tokens_per_s']:,.0f} | {r.get('step_ms', 0):.1f} | "
                       f"{r.get('model_tflops', 0):.1f} | {'' if mfu is None else f'{100 * mfu:.1f}%'} | "
                       f"{r.get('peak_mb', 0):,.0f} |")
    met = targets(by)
    if met:
        out.append("")
        out.append("| target (docs/PERF.md) | measured | met |")
        out.append("| --- | ---: | --- |")
        out.extend(f"| {t} | {v} | {'yes' if ok else 'no'} |" for t, v, ok in met)
    text = "\n".join(out) + "\n"
    print(text)
    base = os.path.join(a.docs, "bench", f"throughput-{a.gpu}-{a.date}")
    os.makedirs(os.path.dirname(base), exist_ok=True)
    with open(base + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(text)

    # tokens/s against sequence length, log-log, one line per model (hydra-1.6b has two points).
    with tempfile.TemporaryDirectory() as tmp:
        plots = []
        for i, m in enumerate(models):
            pts = [(s, by[(m, s)]["tokens_per_s"]) for s in seqs if (m, s) in by and "error" not in by[(m, s)]]
            if not pts:
                continue
            path = os.path.join(tmp, f"{i}.dat")
            with open(path, "w") as f:
                f.writelines(f"{s} {v}\n" for s, v in pts)
            plots.append(f"'{path}' using 1:2 with linespoints lw 2 dt {1 + i % 4} pt {1 + i} title '{m}'")
        png = os.path.join(a.docs, f"throughput-{a.gpu}.png")
        script = ("set terminal pngcairo size 900,560 noenhanced\n"
                  f"set output '{png}'\nset logscale xy 2\nset grid\nset key outside right\n"
                  "set xlabel 'sequence length (tokens)'\nset ylabel 'training tokens/s (32768 tokens/step)'\n"
                  f"set title 'Training throughput on one {a.gpu}, {a.date}'\n"
                  "set format y '%.0s%c'\nplot " + ", ".join(plots) + "\n")
        try:
            subprocess.run(["gnuplot"], input=script, text=True, check=True)
            print("plot:", png)
        except (OSError, subprocess.CalledProcessError) as e:
            print("no plot (gnuplot):", e)
    print("rows:", base + ".json")


if __name__ == "__main__":
    main()
