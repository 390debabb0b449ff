#!/usr/bin/env python3
"""Reads a HYDRA_TRACE file (the Chrome trace hydra-train writes: kernels/device_trace.h) and prints
what the summary at the end of a run leaves out: every kernel's time and count a step (the median over
the steps traced), grouped by family, and the idle gaps of 20 us and more in the median step with the
activities on either side, in time order (where the step waits on the host).

Usage: python3 bench/trace_table.py TRACE.json [--top N] [--gap-us US] [--window FROM TO]
  --window FROM TO  also lists every activity of the median step from FROM to TO ms after its start
                    (start, duration, the idle time before it): what surrounds a gap
"""
import argparse
import json
import re
import statistics
import sys

FAMILIES = [
    ("selective scan", r"scan_(fwd|bwd|carry|bc)"),
    ("SSD scan", r"chunk_(state|out|u|grad)_kernel|state_pass_kernel|reverse_pass_kernel|gA_kernel|head_sum_kernel"),
    ("attention", r"attn_|merge_attention|softmax"),
    ("GEMM (cuBLAS)", r"nvjet|sm90_xmma|gemm|cutlass|splitK|gemv"),
    ("MoE", r"moe_|expert|grouped"),
    ("PKM", r"bag_|pkm|topk|product_key"),
    ("workspace", r"gated_update|gated_scan"),
    ("conv", r"conv_"),
    ("norms", r"rms_norm|layer_norm"),
    ("element-wise", r"binary_|unary_|elementwise|gated_residual|silu|gelu|scale_|axpy|fill_kernel"),
    ("copies", r"copy|memcpy|memset|transpose|gather|scatter|rows_kernel"),
    ("loss", r"loss|cross_entropy|logsumexp"),
    ("optimizer", r"adam|optim|multi_tensor|norm_sq|clip"),
    ("reductions", r"reduce|column_sum|sum_kernel"),
]


def family(name):
    for fam, pat in FAMILIES:
        if re.search(pat, name):
            return fam
    return "other"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace")
    ap.add_argument("--top", type=int, default=60, help="kernels listed (default 60)")
    ap.add_argument("--gap-us", type=float, default=20.0, help="gaps listed from this size (default 20)")
    ap.add_argument("--window", type=float, nargs=2, metavar=("FROM", "TO"),
                    help="list the median step's activities between these ms from its start")
    args = ap.parse_args()
    try:
        events = json.load(open(args.trace))["traceEvents"]
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"trace_table: cannot read {args.trace} as a HYDRA_TRACE file: {e}")
    acts = sorted((e for e in events if e.get("ph") == "X"), key=lambda e: e["ts"])
    marks = sorted(e["ts"] for e in events if e.get("ph") == "i")
    if len(marks) < 2 or not acts:
        sys.exit(f"trace_table: {args.trace} has no whole step (fewer than two step marks)")
    steps = []  # per step: {name: [ms, count]}, busy ms, wall ms, the activities
    for a, b in zip(marks, marks[1:]):
        inside = [e for e in acts if a <= e["ts"] < b]
        per = {}
        for e in inside:
            k = per.setdefault(e["name"], [0.0, 0])
            k[0] += e["dur"] * 1e-3
            k[1] += 1
        steps.append({"kernels": per, "wall": (b - a) * 1e-3, "acts": inside, "start": a, "end": b})
    walls = sorted(s["wall"] for s in steps)
    med = walls[(len(walls) - 1) // 2]
    median_step = next(s for s in steps if s["wall"] == med)
    names = sorted({n for s in steps for n in s["kernels"]})
    table = []
    for n in names:
        ms = statistics.median(s["kernels"].get(n, [0.0, 0])[0] for s in steps)
        cnt = statistics.median(s["kernels"].get(n, [0.0, 0])[1] for s in steps)
        table.append((ms, cnt, n))
    table.sort(reverse=True)
    total = sum(t[0] for t in table)
    print(f"{args.trace}: {len(steps)} steps, the median step {med:.2f} ms, "
          f"kernels and copies {total:.2f} ms a step (medians per name)")
    fams = {}
    for ms, cnt, n in table:
        f = fams.setdefault(family(n), [0.0, 0])
        f[0] += ms
        f[1] += cnt
    print("\nby family                        ms a step   count")
    for f, (ms, cnt) in sorted(fams.items(), key=lambda kv: -kv[1][0]):
        print(f"  {f:30s} {ms:9.3f} {cnt:7.0f}")
    print(f"\nkernels, longest first (top {args.top})   ms a step   count   us each")
    for ms, cnt, n in table[: args.top]:
        print(f"  {n[:48]:48s} {ms:8.3f} {cnt:6.0f} {1e3 * ms / max(cnt, 1):8.1f}")
    print(f"\nthe median step's gaps of {args.gap_us:.0f} us and more, in time order "
          "(ms from the step's start):")
    prev = None
    t_prev_end = median_step["start"]
    for e in median_step["acts"]:
        gap = e["ts"] - t_prev_end
        if gap >= args.gap_us:
            before = prev["name"] if prev else "(step start)"
            print(f"  {1e-3 * (t_prev_end - median_step['start']):8.2f}  {gap:8.1f} us  "
                  f"after {before[:40]}, before {e['name'][:40]}")
        if prev is None or e["ts"] + e["dur"] > t_prev_end:
            t_prev_end = max(t_prev_end, e["ts"] + e["dur"])
        prev = e
    if args.window:
        lo, hi = args.window
        print(f"\nthe median step's activities from {lo:g} to {hi:g} ms "
              "(ms from the step's start, us long, us idle before):")
        end = median_step["start"]
        for e in median_step["acts"]:
            at = 1e-3 * (e["ts"] - median_step["start"])
            if lo <= at <= hi:
                print(f"  {at:8.3f} {e['dur']:8.1f} {max(0.0, e['ts'] - end):8.1f}  {e['name'][:70]}")
            end = max(end, e["ts"] + e["dur"])
    tail = median_step["end"] - t_prev_end
    if tail >= args.gap_us:
        print(f"  {1e-3 * (t_prev_end - median_step['start']):8.2f}  {tail:8.1f} us  "
              f"after {prev['name'][:40] if prev else '-'}, before (the next step)")


if __name__ == "__main__":
    main()
