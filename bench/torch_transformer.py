#!/usr/bin/env python3
"""The PyTorch Transformer of transformer-toy's size, trained as hydra-train trains it, for the throughput
table (bench/throughput.sh): pre-norm blocks of RMSNorm, causal attention with RoPE on q and k (SDPA:
FlashAttention on the GPU), SwiGLU FFN; tied embedding and LM head; bf16 autocast over fp32 master
weights; fused AdamW; gradient clipping at 1.0. Random tokens (the speed does not depend on them).

Usage: torch_transformer.py --seq S [--tokens 32768] [--steps 30] [--warmup 5] [--compile]
        [--d 384 --blocks 8 --heads 6 --d-ff 2304 --vocab 8192]
Prints one JSON object: model, seq, batch, tokens_per_s (median over the steps after warm-up),
step_ms, model_tflops, mfu (against 989 TFLOP/s), peak_mb.
"""
import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.w = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.w, self.eps)


def rope(x, cos, sin):  # x [B, H, L, dh]; rotate pairs (i, i + dh/2)
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Block(nn.Module):
    def __init__(self, d, heads, d_ff):
        super().__init__()
        self.heads = heads
        self.n1, self.n2 = RMSNorm(d), RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, 2 * d_ff, bias=False)
        self.down = nn.Linear(d_ff, d, bias=False)

    def forward(self, x, cos, sin):
        B, L, d = x.shape
        q, k, v = self.qkv(self.n1(x)).view(B, L, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(B, L, d))
        g, u = self.up(self.n2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(g) * u)


class Transformer(nn.Module):
    def __init__(self, vocab, d, blocks, heads, d_ff):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads, d_ff) for _ in range(blocks))
        self.norm = RMSNorm(d)
        self.dh = d // heads

    def forward(self, tokens, targets):
        L = tokens.shape[1]
        pos = torch.arange(L, device=tokens.device, dtype=torch.float32)
        inv = 10000.0 ** (-torch.arange(0, self.dh // 2, device=tokens.device, dtype=torch.float32) / (self.dh // 2))
        ang = pos[:, None] * inv[None, :]
        cos, sin = ang.cos().to(torch.bfloat16), ang.sin().to(torch.bfloat16)
        x = self.emb(tokens)
        for b in self.blocks:
            x = b(x, cos, sin)
        logits = F.linear(self.norm(x), self.emb.weight)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, required=True)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--d-ff", type=int, default=2304)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    a = ap.parse_args()
    torch.manual_seed(1)
    dev = "cuda"
    batch = max(1, a.tokens // a.seq)
    model = Transformer(a.vocab, a.d, a.blocks, a.heads, a.d_ff).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.1, fused=True)
    step_fn = torch.compile(model) if a.compile else model
    tokens = torch.randint(0, a.vocab, (batch, a.seq + 1), device=dev)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    times = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(a.warmup + a.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # the step ends on the host, as hydra-train's does
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    step_s = times[len(times) // 2]
    d, L, nb = a.d, a.seq, a.blocks
    # Model FLOPs per token (forward), counted as hydra-params counts the Transformer: the matmuls, the
    # tied head, and the attention's QK^T and PV over the mean causal key count (L + 1) / 2.
    fwd = 2.0 * a.vocab * d + nb * (2.0 * (4 * d * d + 3 * d * a.d_ff) + 4.0 * d * (L + 1) / 2.0)
    tps = batch * a.seq / step_s
    tflops = tps * 3 * fwd / 1e12
    name = "torch-transformer" + ("-compile" if a.compile else "")
    print(json.dumps({"model": name, "seq": a.seq, "batch": batch, "tokens_per_s": tps, "step_ms": step_s * 1e3,
                      "model_tflops": tflops, "mfu": tflops / a.peak_tflops,
                      "peak_mb": torch.cuda.max_memory_allocated() / 2**20}))


if __name__ == "__main__":
    main()
