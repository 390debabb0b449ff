#!/usr/bin/env python3
"""The same ops as hydra-bench-gpu in PyTorch on the same GPU (eager, and torch.compile where it fuses),
timed with CUDA events, median of repeats after warm-up; before each start event the stream is held
(torch.cuda._sleep) so that the interval measures the device, as hydra-bench-gpu does. Writes JSON rows
keyed like hydra-bench-gpu's."""
import json
import sys

import torch
import torch.nn.functional as F


def time_ms(fn, reps=20, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1_000_000)  # about 0.5 ms of clock cycles: the host queues fn meanwhile
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def main():
    out = sys.argv[sys.argv.index("--json") + 1] if "--json" in sys.argv else None
    dev, bf = "cuda", torch.bfloat16
    rows = []

    def add(kind, name, ms, mode):
        rows.append({"bench": kind, "name": name, "mode": mode, "ms": ms})
        print(f"{kind:10s} {name:44s} {mode:8s} {ms:9.3f} ms", flush=True)

    T, d = 16384, 2048
    for name, m, k, n in [("1.6B ssm in_proj", T, 2048, 8192), ("1.6B ssm out_proj", T, 4096, 2048),
                          ("1.6B sga qkv", T, 2048, 6144), ("1.6B expert up (T/4 rows)", T // 4, 2048, 512),
                          ("1.6B expert down (T/4 rows)", T // 4, 512, 2048), ("1.6B lm head", 8192, 2048, 50304),
                          ("toy ssm in_proj", T, 384, 1536), ("toy ssm out_proj", T, 768, 384),
                          ("toy expert up (T/4 rows)", T // 4, 384, 192), ("toy lm head", 8192, 384, 8192)]:
        x = torch.randn(m, k, device=dev, dtype=bf)
        w = torch.randn(n, k, device=dev, dtype=bf) * 0.02
        with torch.no_grad():
            add("gemm", name, time_ms(lambda: F.linear(x, w)), "eager")

    # The MoE layer's experts: a loop of per-expert GEMMs (eager) and torch._grouped_mm (one launch),
    # forward and forward + backward, as hydra-bench-gpu's grouped rows.
    for name, E, per, k, n in [("1.6B 8 experts up, grouped", 8, T // 4, 2048, 512),
                                ("1.6B 8 experts down, grouped", 8, T // 4, 512, 2048),
                                ("toy 8 experts up, grouped", 8, T // 4, 384, 192)]:
        x = torch.randn(E * per, k, device=dev, dtype=bf)
        w = torch.randn(E, n, k, device=dev, dtype=bf) * 0.02
        gy = torch.randn(E * per, n, device=dev, dtype=bf)
        offs = torch.arange(1, E + 1, device=dev, dtype=torch.int32) * per
        loop = lambda xx, ww: torch.cat([F.linear(xx[e * per:(e + 1) * per], ww[e]) for e in range(E)])
        grouped = lambda xx, ww: torch._grouped_mm(xx, ww.transpose(-2, -1), offs=offs)
        for mode, fn in (("eager", loop), ("grouped_mm", grouped)):
            try:
                with torch.no_grad():
                    add("gemm", name, time_ms(lambda: fn(x, w)), mode)
                xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()

                def fb():
                    xr.grad = wr.grad = None
                    fn(xr, wr).backward(gy)
                add("gemm", name + " fwd+bwd", time_ms(fb), mode)
            except (AttributeError, RuntimeError) as e:  # no _grouped_mm in this PyTorch or on this GPU
                print(f"{name} {mode}: {e}", flush=True)

    # Sparse global attention (window 512, global stride 256): SDPA with the pattern as a dense boolean
    # mask (eager), and FlexAttention with it as a block mask (compiled: it skips the empty blocks).
    for name, B, L, H, dh in [("1.6B attention [8 x 2048, 16 x 128]", 8, 2048, 16, 128),
                              ("toy attention [16 x 2048, 6 x 64]", 16, 2048, 6, 64)]:
        pos = torch.arange(L, device=dev)
        keep = lambda t, k: (k <= t) & ((t - k < 512) | (k % 256 == 0) | (t % 256 == 0))
        mask = keep(pos[:, None], pos[None, :])
        q, k, v, go = (torch.randn(B, H, L, dh, device=dev, dtype=bf) for _ in range(4))
        sdpa = lambda qq, kk, vv: F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask)
        runs = [("eager", sdpa)]
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            bm = create_block_mask(lambda b, h, t, kk: keep(t, kk), B=None, H=None, Q_LEN=L, KV_LEN=L)
            flex = torch.compile(flex_attention)
            runs.append(("compile", lambda qq, kk, vv: flex(qq, kk, vv, block_mask=bm)))
        except (ImportError, RuntimeError) as e:
            print(f"{name}: no FlexAttention ({e})", flush=True)
        for mode, fn in runs:
            try:
                with torch.no_grad():
                    add("gemm", name + " fwd", time_ms(lambda: fn(q, k, v)), mode)
                qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))

                def fb():
                    qr.grad = kr.grad = vr.grad = None
                    fn(qr, kr, vr).backward(go)
                add("gemm", name + " fwd+bwd", time_ms(fb), mode)
            except (RuntimeError, torch.OutOfMemoryError) as e:
                print(f"{name} {mode}: {e}", flush=True)

    for width in (2048, 384):
        shape = f"[{T}, {width}]"
        x = torch.randn(T, width, device=dev, dtype=bf)
        w = torch.randn(width, device=dev, dtype=bf)
        gy = torch.randn(T, width, device=dev, dtype=bf)
        rms = lambda t, ww, width=width: F.rms_norm(t, (width,), ww, 1e-6)
        rms_c = torch.compile(rms)
        with torch.no_grad():
            add("bandwidth", f"rms_norm fwd {shape}", time_ms(lambda: rms(x, w)), "eager")
            add("bandwidth", f"rms_norm fwd {shape}", time_ms(lambda: rms_c(x, w)), "compile")
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()

        def rms_fb(f):
            xr.grad = wr.grad = None  # gradients into fresh buffers (no accumulation), as in our bench
            f(xr, wr).backward(gy)

        add("bandwidth", f"rms_norm fwd+bwd {shape}", time_ms(lambda: rms_fb(rms)), "eager")
        add("bandwidth", f"rms_norm fwd+bwd {shape}", time_ms(lambda: rms_fb(rms_c)), "compile")
        xs = torch.randn(T, width, device=dev, dtype=bf) * 3
        with torch.no_grad():
            add("bandwidth", f"softmax fwd {shape}", time_ms(lambda: torch.softmax(xs, -1)), "eager")
    for r, V in ((8192, 50304), (16384, 8192)):
        shape = f"[{r}, {V}]"
        logits = torch.randn(r, V, device=dev, dtype=bf) * 2
        targets = torch.randint(0, V, (r,), device=dev)
        with torch.no_grad():
            add("bandwidth", f"cross_entropy fwd {shape}", time_ms(lambda: F.cross_entropy(logits, targets)), "eager")
        lr_ = logits.clone().requires_grad_()
        ce_c = torch.compile(lambda a, b: F.cross_entropy(a, b))

        def ce_fb(f):
            lr_.grad = None
            f(lr_, targets).backward()

        add("bandwidth", f"cross_entropy fwd+bwd {shape}", time_ms(lambda: ce_fb(F.cross_entropy)), "eager")
        add("bandwidth", f"cross_entropy fwd+bwd {shape}", time_ms(lambda: ce_fb(ce_c)), "compile")
    a = torch.randn(T, 8192, device=dev, dtype=bf)
    b = torch.randn(T, 8192, device=dev, dtype=bf)
    with torch.no_grad():
        add("bandwidth", "silu [16384, 8192]", time_ms(lambda: F.silu(a)), "eager")
        add("bandwidth", "mul [16384, 8192]", time_ms(lambda: a * b), "eager")
        table = torch.randn(50304, d, device=dev, dtype=bf)
        idx = torch.randint(0, 50304, (T,), device=dev)
        add("bandwidth", "embedding fwd [16384 of 50304 x 2048]", time_ms(lambda: F.embedding(idx, table)), "eager")
    n = 100 << 20
    p = torch.randn(n, device=dev).requires_grad_()
    p.grad = torch.randn(n, device=dev)
    opt = torch.optim.AdamW([p], lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    opt.step()
    add("bandwidth", "adamw f32 [100M params]", time_ms(lambda: opt.step()), "fused")
    k = 400
    ps = [torch.randn(n // k, device=dev).requires_grad_() for _ in range(k)]
    for q in ps:
        q.grad = torch.randn(n // k, device=dev)
    opt_many = torch.optim.AdamW(ps, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    opt_many.step()
    add("bandwidth", "adamw f32 [400 tensors, 100M params]", time_ms(lambda: opt_many.step()), "fused")
    if out:
        with open(out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
