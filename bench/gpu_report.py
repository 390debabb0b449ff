#!/usr/bin/env python3
"""Joins hydra-bench-gpu's and torch_compare.py's JSON into the PERF.md table: each row with its floor
(and, for memory-bound ops, against a device copy of their own size) and the throughput ratio ours/PyTorch (> 1: ours is faster) for eager and compiled PyTorch. For the grouped
expert GEMMs, "eager" is a loop of per-expert GEMMs and the second column torch._grouped_mm (marked *)."""
import json
import sys

ours = json.load(open(sys.argv[1]))
torch = json.load(open(sys.argv[2]))
floor = next(r for r in ours["rows"] if r["bench"] == "floor")
print(f"device: {ours['meta'].get('device')}; torch {torch['torch']}")
print(f"floors: copy {floor['copy_gbs']:.0f} GB/s, bf16 GEMM {floor['bf16_gemm_tflops']:.0f} TFLOP/s\n")
tt = {}
for r in torch["rows"]:
    tt.setdefault(r["name"], {})[r["mode"]] = r["ms"]
print("| op | ours ms | ours rate | of floor | of same-size copy | PyTorch eager ms | ours/eager | PyTorch compiled ms "
      "| ours/compiled |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for r in ours["rows"]:
    if r["bench"] == "floor":
        continue
    name = r.get("shape") or r.get("kernel")
    rate = f"{r['tflops']:.0f} TFLOP/s" if r["bench"] == "gemm" else f"{r['gbs']:.0f} GB/s"
    of = r.get("of_peak", r.get("of_copy"))
    t = tt.get(name, {})
    eager = t.get("eager", t.get("fused"))
    comp = t.get("compile", t.get("grouped_mm"))
    cell = lambda v: f"{v:.3f}" if v else "-"
    ratio = lambda v: f"{v / r['ms']:.2f}" if v else "-"
    if "grouped_mm" in t:
        name += " *"
    same = f"{r['of_copy_same_size']:.2f}" if "of_copy_same_size" in r else "-"
    print(f"| {name} | {r['ms']:.3f} | {rate} | {of:.2f} | {same} | {cell(eager)} | {ratio(eager)} | {cell(comp)} "
          f"| {ratio(comp)} |")
