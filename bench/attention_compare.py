#!/usr/bin/env python3
"""Fused attention libraries on the shapes where hydra-bench-gpu times our kernels (issue 17: "measure
cuDNN's fused flash attention against ours, keep whichever is faster").

The shapes are hydra-bench-gpu's "causal attention" and "window-512 attention" rows: bf16, 6 heads of
64 (transformer-toy, and toy's sparse attention), 32,768 tokens a call (batch 32768 / seq) at seq 2048,
8192 and 32768, the inputs in our layout ([batch, seq, heads, 64], seen as [batch, heads, seq, 64]),
forward and forward + backward. Timed with CUDA events after warm-up; the median of the repeats.

- causal: torch.nn.functional.scaled_dot_product_attention(is_causal=True) with each backend that
  runs (torch.nn.attention.sdpa_kernel): CUDNN_ATTENTION (cuDNN's fused flash attention),
  FLASH_ATTENTION, EFFICIENT_ATTENTION;
- window-512 (a query sees itself and the 511 keys before it): cuDNN's graph API through its Python
  frontend (`import cudnn`, sdpa with a sliding window), when that package is installed. PyTorch's
  SDPA takes no window; a dense mask would not run a flash kernel.

FLOPs count the kept query-key pairs as hydra-bench-gpu does: 4 * 64 per pair forward, 3.5x that
forward + backward.

Usage: attention_compare.py [--repeats 20] [--warmup 5] [--seqs 2048,8192,32768] [--json FILE]
Prints a table, and with --json writes one JSON object a line: library, pattern, seq, batch, pass,
ms, tflops (or error, where a library refused the shape).
"""
import argparse
import json
import math
import sys

import torch
import torch.nn.functional as F

from torch_compare import time_ms  # CUDA events after warm-up, the host queued ahead (same folder)

HEADS, HEAD_DIM, TOKENS, WINDOW = 6, 64, 32768, 512


def pairs(seq, window):
    """Query-key pairs a causal pattern keeps (window 0: dense)."""
    if window == 0:
        return seq * (seq + 1) / 2
    full = min(seq, window)
    return full * (full + 1) / 2 + (seq - full) * window


def inputs(batch, seq, grad):
    """q, k, v and the output gradient in our layout [B, L, H, dh], seen as [B, H, L, dh]."""
    g = torch.Generator(device="cuda").manual_seed(seq)
    make = lambda: torch.randn(batch, seq, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16,
                               generator=g).transpose(1, 2)
    q, k, v, go = make(), make(), make(), make()
    if grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v, go


def torch_sdpa(backend_name, batch, seq, backward, warmup, repeats):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = getattr(SDPBackend, backend_name)
    q, k, v, go = inputs(batch, seq, backward)
    scale = 1.0 / math.sqrt(HEAD_DIM)

    def step():
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
            if backward:
                for t in (q, k, v):
                    t.grad = None
                out.backward(go)

    if not backward:
        with torch.no_grad():
            return time_ms(step, reps=repeats, warmup=warmup)
    return time_ms(step, reps=repeats, warmup=warmup)


def cudnn_window(batch, seq, backward, warmup, repeats):
    import cudnn  # the cuDNN frontend's Python package (pip: nvidia-cudnn-frontend)
    handle = cudnn.create_handle()
    q, k, v, go = (t.detach() for t in inputs(batch, seq, False))
    o = torch.empty_like(q)
    stats = torch.empty(batch, HEADS, seq, 1, device="cuda", dtype=torch.float32)
    scale = 1.0 / math.sqrt(HEAD_DIM)

    def graph():
        return cudnn.pygraph(io_data_type=cudnn.data_type.BFLOAT16,
                             intermediate_data_type=cudnn.data_type.FLOAT,
                             compute_data_type=cudnn.data_type.FLOAT, handle=handle)

    def window_args():
        # Newer frontends name the band's bounds; older ones take a window length.
        return [dict(diagonal_band_left_bound=WINDOW, diagonal_band_right_bound=0),
                dict(use_causal_mask=True, sliding_window_length=WINDOW)]

    def build(g):
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()

    def forward_graph():
        first = None
        for extra in window_args():
            g = graph()
            tq, tk, tv = g.tensor_like(q), g.tensor_like(k), g.tensor_like(v)
            try:
                to, ts = g.sdpa(name="sdpa", q=tq, k=tk, v=tv, is_inference=False,
                                attn_scale=scale, **extra)
            except TypeError as e:  # this frontend names the window the other way
                first = first or e
                continue
            to.set_output(True).set_dim(o.size()).set_stride(o.stride())
            ts.set_output(True).set_dim(stats.size()).set_stride(stats.stride())
            ts.set_data_type(cudnn.data_type.FLOAT)
            build(g)  # raises if cuDNN does not support the graph
            return g, {tq: q, tk: k, tv: v, to: o, ts: stats}, extra
        raise RuntimeError(f"this cuDNN frontend takes no sliding window: {first}")

    fwd, fwd_pack, extra = forward_graph()
    packs = [(fwd, fwd_pack)]
    if backward:
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        g = graph()
        tq, tk, tv, to, tgo, ts = (g.tensor_like(t) for t in (q, k, v, o, go, stats))
        tdq, tdk, tdv = g.sdpa_backward(name="sdpa_backward", q=tq, k=tk, v=tv, o=to, dO=tgo,
                                        stats=ts, attn_scale=scale, **extra)
        for t, ref in ((tdq, dq), (tdk, dk), (tdv, dv)):
            t.set_output(True).set_dim(ref.size()).set_stride(ref.stride())
        build(g)
        packs.append((g, {tq: q, tk: k, tv: v, to: o, tgo: go, ts: stats, tdq: dq, tdk: dk,
                          tdv: dv}))
    size = max(g.get_workspace_size() for g, _ in packs)
    workspace = torch.empty(max(size, 1), device="cuda", dtype=torch.uint8)

    def step():
        for g, pack in packs:
            g.execute(pack, workspace, handle=handle)

    return time_ms(step, reps=repeats, warmup=warmup)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--seqs", default="2048,8192,32768")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("attention_compare.py: no CUDA device")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"cuDNN {torch.backends.cudnn.version()}")
    rows = []
    print(f"{'library':<28} {'pattern':<12} {'shape':<22} {'pass':<8} {'ms':>9} {'TFLOP/s':>9}")
    for seq in (int(s) for s in a.seqs.split(",")):
        batch = TOKENS // seq
        for backward in (False, True):
            runs = [(f"torch {b}", "causal", 0, lambda b=b: torch_sdpa(
                        b, batch, seq, backward, a.warmup, a.repeats))
                    for b in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION")]
            runs.append(("cudnn frontend", "window-512", WINDOW,
                         lambda: cudnn_window(batch, seq, backward, a.warmup, a.repeats)))
            for library, pattern, window, run in runs:
                row = dict(library=library, pattern=pattern, seq=seq, batch=batch,
                           **{"pass": "fwd+bwd" if backward else "fwd"})
                try:
                    ms = run()
                    flops = (3.5 if backward else 1.0) * 4 * HEAD_DIM * pairs(seq, window) * batch * HEADS
                    row.update(ms=ms, tflops=flops / ms / 1e9)
                    shown = f"{ms:9.3f} {row['tflops']:9.1f}"
                except Exception as e:  # a backend that refuses the shape, or a missing package
                    row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
                    shown = f"  ({row['error'][:60]})"
                    torch.cuda.synchronize()
                rows.append(row)
                print(f"{library:<28} {pattern:<12} {f'[{batch} x {seq}, 6 x 64]':<22} "
                      f"{row['pass']:<8} {shown}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
