#!/usr/bin/env python3
"""Each GEMM shape of a step against its floor, from a detailed kernel profile.

    HYDRA_PROFILE=2 hydra-train ... > run.log
    python3 bench/gemm_floor.py run.log --device h100

The profile's rows "gemm MxNxK dtype LAYOUT bB  total_ms  share  launches  us" (autograd/profiler.h)
are totals over the steps its header counts ("per step (S steps after the first, evaluation
included)"). A shape's floor is the larger of its FLOPs (2 M N K a batch entry) at the GEMM peak and
its bytes (A, B and C once each, in the dtype) at the copy bandwidth. The table lists the shapes by
the time a step spends above their floors, largest first, then the sums: where GEMM time goes and
how much of it the shapes' own arithmetic and traffic explain."""
import argparse
import re
import sys

# Measured peaks (docs/PERF.md): bf16 GEMM TFLOP/s and device-copy TB/s.
DEVICES = {"h200": (770.0, 4.1), "h100": (700.0, 3.35)}
ROW = re.compile(r"^\s*gemm (\d+)x(\d+)x(\d+) (\w+) (\w+) b(\d+)\s+([\d.]+)\s+[\d.]+%\s+(\d+)\s+([\d.]+)")
STEPS = re.compile(r"per step \((\d+) steps after the first")
SIZE = {"bf16": 2, "f32": 4, "f64": 8}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profile", help="hydra-train's output with HYDRA_PROFILE=2")
    ap.add_argument("--device", choices=sorted(DEVICES), default="h200")
    ap.add_argument("--peak-tflops", type=float, help="overrides the device's GEMM peak")
    ap.add_argument("--bandwidth-tbs", type=float, help="overrides the device's copy bandwidth")
    ap.add_argument("--top", type=int, default=25, help="rows to list (default 25)")
    a = ap.parse_args()
    peak, bw = DEVICES[a.device]
    peak = (a.peak_tflops or peak) * 1e12
    bw = (a.bandwidth_tbs or bw) * 1e12
    steps, rows = None, []
    for line in open(a.profile):
        m = STEPS.search(line)
        if m:
            steps = int(m.group(1))
        m = ROW.match(line)
        if m:
            M, N, K = (int(m.group(i)) for i in (1, 2, 3))
            dtype, layout, b = m.group(4), m.group(5), int(m.group(6))
            total_ms, launches = float(m.group(7)), int(m.group(8))
            flop_s = 2.0 * M * N * K * b / peak
            byte_s = SIZE.get(dtype, 2) * b * (M * K + K * N + M * N) / bw
            floor_us = 1e6 * max(flop_s, byte_s)
            rows.append(dict(shape=f"{M}x{N}x{K} {dtype} {layout} b{b}", launches=launches,
                             total_ms=total_ms, us=1000.0 * total_ms / launches, floor_us=floor_us,
                             bound="FLOPs" if flop_s >= byte_s else "bytes"))
    if not rows:
        sys.exit(f"gemm_floor.py: no 'gemm MxNxK ...' rows in {a.profile} (run with HYDRA_PROFILE=2)")
    if not steps:
        sys.exit(f"gemm_floor.py: no 'per step (S steps after the first' line in {a.profile}")
    for r in rows:
        r["excess_ms"] = (r["total_ms"] - r["launches"] * r["floor_us"] / 1000.0) / steps
    rows.sort(key=lambda r: -r["excess_ms"])
    print(f"{a.profile}: {len(rows)} GEMM shapes over {steps} steps; floors at "
          f"{peak / 1e12:.0f} TFLOP/s and {bw / 1e12:.2f} TB/s\n")
    print("| shape (M x N x K, layout, batch) | launches a step | us each | floor us | bound | of floor | "
          "ms a step above the floor |")
    print("| --- | ---: | ---: | ---: | --- | ---: | ---: |")
    for r in rows[: a.top]:
        print(f"| {r['shape']} | {r['launches'] / steps:.1f} | {r['us']:.1f} | {r['floor_us']:.1f} | "
              f"{r['bound']} | {r['us'] / r['floor_us']:.2f}x | {r['excess_ms']:.3f} |")
    total = sum(r["total_ms"] for r in rows) / steps
    floor = sum(r["launches"] * r["floor_us"] for r in rows) / 1000.0 / steps
    print(f"\nGEMMs with a shape: {total:.2f} ms a step, their floors {floor:.2f} ms "
          f"({total / floor:.2f}x); above the floors {total - floor:.2f} ms")


if __name__ == "__main__":
    main()
