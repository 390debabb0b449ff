#!/usr/bin/env python3
"""Hydra's forward pass in PyTorch, from a safetensors export (`hydra-ckpt export`): the reader that
shows an export is complete and means what it says. It rebuilds the model from the export's
metadata (`hydra_model`: the resolved sizes, memory placements, attention pattern and the paths
the checkpoint's curriculum stage had on), computes the next-token loss of a text, and with
`--expect` checks it against the loss `hydra-eval RUN --text FILE` printed for the same tokens.

Written from the model's definition (../shared/spec/hydra.md, docs/MODEL.md), not from our kernels:
plain tensor code in float64, dense masked attention, Python loops over time for the scans. Meant
for checking and for porting, at the tiny and toy sizes; not fast.

Usage: hydra_torch.py MODEL.safetensors --text FILE [--expect LOSS] [--tolerance 1e-4]
                      [--paths ssm,sga,moe_routing,workspace,pkm] [--device cpu]
Text is tokenized as bytes (the built-in tasks' and byte shards' tokenizer). Prints one JSON line
(tokens, loss); exits 1 when --expect differs by more than the relative tolerance, 3 when the
export uses a form this reader does not implement (ssm.form SSD).
"""
import argparse
import json
import math
import struct
import sys

import torch
import torch.nn.functional as F

DT = torch.float64


def load_safetensors(path, device):
    """Tensors and metadata of a safetensors file (the safetensors package when installed)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    meta = header.pop("__metadata__", {})
    dtypes = {"F32": torch.float32, "F64": torch.float64, "BF16": torch.bfloat16}
    tensors = {}
    for name, t in header.items():
        b, e = t["data_offsets"]
        x = torch.frombuffer(bytearray(data[b:e]), dtype=dtypes[t["dtype"]]).reshape(t["shape"])
        tensors[name] = x.to(device=device, dtype=DT)
    return tensors, meta


def rms_norm(x, w, eps):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w


def linear(x, w, b=None):
    y = x @ w.T
    return y if b is None else y + b


def rope(x, pos0, theta):  # x [L, H, dh]: pairs (i, i + dh/2) rotated by pos * theta^(-2i/dh)
    L, _, dh = x.shape
    half = dh // 2
    freq = theta ** (-2.0 * torch.arange(half, dtype=DT, device=x.device) / dh)
    ang = (pos0 + torch.arange(L, dtype=DT, device=x.device))[:, None] * freq[None, :]
    c, s = torch.cos(ang)[:, None, :], torch.sin(ang)[:, None, :]
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * c - b * s, a * s + b * c], dim=-1)


def attention(q, k, v, visible):  # q [Lq, H, dh], k v [Lk, H, dh], visible [Lq, Lk] bool
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~visible[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), v)


class Hydra:
    def __init__(self, p, m, paths):
        self.p, self.m, self.paths = p, m, paths

    # hydra.md section 2: in_proj -> causal conv + SiLU -> x_proj (dt, B, C) -> selective scan with
    # the skip D and the SiLU(z) gate -> out_proj.
    def ssm(self, x, pre):
        s, p = self.m["ssm"], self.p
        di, N, R, W = s["d_inner"], s["d_state"], s["dt_rank"], s["conv_width"]
        L = x.shape[0]
        xz = linear(x, p[pre + "in_proj.weight"])
        u, z = xz[:, :di], xz[:, di:]
        if W > 0:  # pre[t, c] = bias[c] + sum_k w[c, k] u[t - (W-1) + k, c]
            w = p[pre + "conv_weight"]
            padded = torch.cat([torch.zeros(W - 1, di, dtype=DT, device=x.device), u], 0)
            u = p[pre + "conv_bias"] + sum(w[:, k] * padded[k:k + L] for k in range(W))
        u = F.silu(u)
        x_dbl = linear(u, p[pre + "x_proj.weight"])
        dt_in, Bm, Cm = x_dbl[:, :R], x_dbl[:, R:R + N], x_dbl[:, R + N:]
        delta = F.softplus(linear(dt_in, p[pre + "dt_proj.weight"]) + p[pre + "dt_proj.bias"])
        A = -torch.exp(p[pre + "A_log"])  # [di, N]
        h = torch.zeros(di, N, dtype=DT, device=x.device)
        ys = []
        for t in range(L):  # h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t;  y_t = C_t . h_t
            h = torch.exp(delta[t][:, None] * A) * h + (delta[t] * u[t])[:, None] * Bm[t][None, :]
            ys.append(h @ Cm[t])
        y = (torch.stack(ys) + p[pre + "D"] * u) * F.silu(z)
        return linear(y, p[pre + "out_proj.weight"])

    # hydra.md section 3: a key s is visible to a query t when s <= t and (t - s < window, or s or
    # t is global: a multiple of global_stride).
    def visible(self, L, window, stride):
        t = torch.arange(L)[:, None]
        s = torch.arange(L)[None, :]
        near = (t - s < window) if window > 0 else torch.ones(L, L, dtype=torch.bool)
        glob = ((s % stride == 0) | (t % stride == 0)) if stride > 0 else torch.zeros(L, L, dtype=torch.bool)
        return (s <= t) & (near | glob)

    def sga(self, x, pre, heads, window, stride):
        L, d = x.shape
        qkv = linear(x, self.p[pre + "qkv.weight"]).view(L, 3, heads, d // heads)
        theta = self.m["rope_theta"]
        q, k = rope(qkv[:, 0], 0, theta), rope(qkv[:, 1], 0, theta)
        a = attention(q, k, qkv[:, 2], self.visible(L, window, stride).to(x.device))
        return linear(a.reshape(L, d), self.p[pre + "out.weight"])

    # hydra.md section 4 with BlockFFN's router: chunk j routes on the previous chunk's mean
    # (chunk 0: its first token) or its own first token; s = ReLU(W_r u), r = RMSNorm(s); the
    # max_active largest r_e with s_e > 0 (ties: the lower expert) weigh their experts' outputs.
    def moe(self, x, pre):
        mo, p = self.m["moe"], self.p
        L, d = x.shape
        c, E = mo["chunk"], mo["num_experts"]
        nC = L // c

        def expert(e, rows):
            a = F.silu(rows @ p[pre + "w1"][e].T)
            if mo["gated_experts"]:
                a = a * (rows @ p[pre + "w3"][e].T)
            return a @ p[pre + "w2"][e].T

        out = torch.zeros_like(x)
        if not self.paths["moe_routing"]:  # every expert on every token, averaged: a dense FFN
            for e in range(E):
                out = out + expert(e, x) / E
        else:
            chunks = x.view(nC, c, d)
            first = chunks[:, 0]
            if mo["router_input"] == "PREV_CHUNK_MEAN":
                rin = torch.cat([first[:1], chunks.mean(1)[:-1]], 0)
            else:
                rin = first
            s = F.relu(linear(rin, p[pre + "router_weight"]))
            r = rms_norm(s, p[pre + "router_norm"], mo["router_eps"])
            for j in range(nC):
                order = sorted(range(E), key=lambda e: (-r[j, e].item(), e))
                for e in order[:mo["max_active"]]:
                    if s[j, e] <= 0:
                        break
                    out[j * c:(j + 1) * c] += r[j, e] * expert(e, chunks[j])
        if mo["shared_expert"]:
            out = out + linear(F.silu(linear(x, p[pre + "shared.w1.weight"])) *
                               linear(x, p[pre + "shared.w3.weight"]), p[pre + "shared.w2.weight"])
        return out

    def block(self, x, b):
        pre, p = f"blocks.{b}.", self.p
        eps = self.m["norm_eps"]
        has_sga = b in self.m["sga"]["blocks"]
        paths = []  # (output, gate, controller column)
        if self.paths["ssm"]:
            paths.append((self.ssm(rms_norm(x, p[pre + "norm_ssm.weight"], eps), pre + "ssm."),
                          p[pre + "gate_ssm"], 0))
        if has_sga and self.paths["sga"]:
            g = self.m["sga"]
            paths.append((self.sga(rms_norm(x, p[pre + "norm_sga.weight"], eps), pre + "sga.",
                                   g["heads"], g["window"], g["global_stride"]),
                          p[pre + "gate_sga"], 1))
        paths.append((self.moe(rms_norm(x, p[pre + "norm_moe.weight"], eps), pre + "moe."),
                      p[pre + "gate_moe"], 2 if has_sga else 1))
        if self.m["controller"]:  # softmax over the paths on, times their number
            logits = linear(rms_norm(x, p[pre + "norm_ctrl.weight"], eps), p[pre + "ctrl.weight"])
            mix = torch.softmax(logits[:, [col for _, _, col in paths]], -1) * len(paths)
        else:
            mix = torch.ones(x.shape[0], len(paths), dtype=DT, device=x.device)
        for i, (out, gate, _) in enumerate(paths):
            x = x + out * gate * mix[:, i:i + 1]
        return x

    # hydra.md section 5: chunk j's tokens read the slots S_j; then the slots write:
    # upd = CrossAttn(queries from S_j (SERIAL) or the learned S_0 (PARALLEL) -> chunk j's tokens),
    # g = sigmoid(w . [S_j; upd] + b) per slot, S_{j+1} = S_j + g (upd - S_j).
    def workspace(self, x, pre):
        w, p = self.m["workspace"], self.p
        L, d = x.shape
        c, H, a = w["chunk"], w["heads"], w["dim"]
        ah = a // H
        every = lambda n, m: torch.ones(n, m, dtype=torch.bool, device=x.device)
        heads = lambda t: t.view(t.shape[0], H, ah)
        S0 = p[pre + "slots"]
        S, outs = S0, []
        for j in range(L // c):
            xc = x[j * c:(j + 1) * c]
            read = attention(heads(linear(xc, p[pre + "read_q.weight"])),
                             heads(linear(S, p[pre + "read_k.weight"])),
                             heads(linear(S, p[pre + "read_v.weight"])), every(c, S.shape[0]))
            outs.append(linear(read.reshape(c, a), p[pre + "read_o.weight"]))
            asking = S0 if w["write"] == "PARALLEL" else S
            o = attention(heads(linear(asking, p[pre + "write_q.weight"])),
                          heads(linear(xc, p[pre + "write_k.weight"])),
                          heads(linear(xc, p[pre + "write_v.weight"])), every(S.shape[0], c))
            upd = linear(o.reshape(S.shape[0], a), p[pre + "write_o.weight"])
            g = torch.sigmoid(linear(torch.cat([S, upd], -1), p[pre + "gate.weight"],
                                     p[pre + "gate.bias"]))
            S = S + g * (upd - S)
        return torch.cat(outs, 0)

    # hydra.md section 6: per head, q = RMSNorm(W_q x) in halves; the top-k sub-keys of each half;
    # the top-k of the k x k sums; softmax over them weighs values[i1 * n + i2].
    def pkm(self, x, pre):
        k_, p = self.m["pkm"], self.p
        H, kd, n, topk = k_["heads"], k_["k_dim"], k_["n_keys"], k_["topk"]
        L = x.shape[0]
        half = kd // 2
        q = rms_norm(linear(x, p[pre + "query.weight"]).view(L, H, kd), p[pre + "query_norm"],
                     self.m["norm_eps"])
        keys, values = p[pre + "keys"], p[pre + "values"]
        out = torch.zeros_like(x)
        for h in range(H):
            v1, i1 = torch.topk(q[:, h, :half] @ keys[h, 0].T, topk, dim=-1)
            v2, i2 = torch.topk(q[:, h, half:] @ keys[h, 1].T, topk, dim=-1)
            grid = (v1[:, :, None] + v2[:, None, :]).reshape(L, topk * topk)
            scores, cell = torch.topk(grid, topk, dim=-1)
            index = torch.gather(i1, 1, cell // topk) * n + torch.gather(i2, 1, cell % topk)
            out = out + (torch.softmax(scores, -1)[:, :, None] * values[index]).sum(1)
        return out

    def logits(self, tokens):
        p, m = self.p, self.m
        x = p["embedding"][tokens]
        eps = m["norm_eps"]
        for b in range(m["num_blocks"]):
            x = self.block(x, b)
            for i, after in enumerate(m["workspace"]["after_block"]):
                if after == b and self.paths["workspace"]:
                    pre = f"workspaces.{i}."
                    x = x + p[pre + "gate"] * self.workspace(
                        rms_norm(x, p[pre + "norm.weight"], eps), pre + "memory.")
            for i, after in enumerate(m["pkm"]["after_block"]):
                if after == b and self.paths["pkm"]:
                    pre = f"pkms.{i}."
                    x = x + p[pre + "gate"] * self.pkm(rms_norm(x, p[pre + "norm.weight"], eps),
                                                      pre + "memory.")
        return linear(rms_norm(x, p["final_norm.weight"], eps), p["embedding"])


class Transformer:
    """The dense baseline: pre-norm blocks of causal attention (RoPE) and a SwiGLU FFN."""

    def __init__(self, p, m):
        self.p, self.m = p, m

    def logits(self, tokens):
        p, m = self.p, self.m
        x = p["embedding"][tokens]
        eps, L = m["norm_eps"], len(tokens)
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        for b in range(m["num_blocks"]):
            pre = f"blocks.{b}."
            h = rms_norm(x, p[pre + "norm_attn.weight"], eps)
            H = m["tf_heads"]
            qkv = linear(h, p[pre + "attn.qkv.weight"]).view(L, 3, H, m["d"] // H)
            q, k = rope(qkv[:, 0], 0, m["rope_theta"]), rope(qkv[:, 1], 0, m["rope_theta"])
            x = x + linear(attention(q, k, qkv[:, 2], causal).reshape(L, m["d"]),
                           p[pre + "attn.out.weight"])
            h = rms_norm(x, p[pre + "norm_ffn.weight"], eps)
            x = x + linear(F.silu(linear(h, p[pre + "ffn.w1.weight"])) * linear(h, p[pre + "ffn.w3.weight"]),
                           p[pre + "ffn.w2.weight"])
        return linear(rms_norm(x, p["final_norm.weight"], eps), p["embedding"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a safetensors export (hydra-ckpt export RUN --out FILE)")
    ap.add_argument("--text", required=True, help="the text whose next-token loss to compute (bytes)")
    ap.add_argument("--expect", type=float, help="the loss hydra-eval --text printed; exit 1 if it differs")
    ap.add_argument("--tolerance", type=float, default=1e-4, help="relative, for --expect")
    ap.add_argument("--paths", help="the paths on (default: the export's stage), e.g. ssm,moe_routing")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    params, meta = load_safetensors(args.model, args.device)
    if "hydra_model" not in meta:
        sys.exit(f"{args.model}: no hydra_model in its metadata (export it with a newer hydra-ckpt)")
    m = json.loads(meta["hydra_model"])
    tokens = torch.tensor(list(open(args.text, "rb").read()), dtype=torch.long, device=args.device)
    if len(tokens) < 2 or len(tokens) > m["max_seq_len"]:
        sys.exit(f"{args.text}: {len(tokens)} tokens; expected 2 to {m['max_seq_len']} (max_seq_len)")
    if m["kind"] == "transformer":
        model = Transformer(params, m)
        inputs = tokens[:-1]
    else:
        if m["ssm"]["form"] != "SELECTIVE":
            print(f"{args.model}: ssm.form {m['ssm']['form']} is not implemented here", file=sys.stderr)
            sys.exit(3)
        paths = {k: v for k, v in m["paths"].items() if k != "stage"}
        if args.paths is not None:
            on = set(args.paths.split(",")) - {""}
            unknown = on - set(paths)
            if unknown:
                sys.exit(f"--paths: unknown {sorted(unknown)}; expected some of {sorted(paths)}")
            paths = {k: k in on for k in paths}
        model = Hydra(params, m, paths)
        # Whole chunks: the inputs padded at the end (causal, so no real position sees the padding).
        step = math.lcm(m["moe"]["chunk"], m["workspace"]["chunk"])
        inputs = tokens[:-1]
        pad = (-len(inputs)) % step
        inputs = torch.cat([inputs, torch.zeros(pad, dtype=torch.long, device=args.device)])
    with torch.no_grad():
        logits = model.logits(inputs)[:len(tokens) - 1]
        loss = F.cross_entropy(logits, tokens[1:]).item()
    row = {"model": args.model, "text": args.text, "tokens": len(tokens), "loss": loss}
    if args.expect is not None:
        row["expect"] = args.expect
        row["relative_difference"] = abs(loss - args.expect) / abs(args.expect)
    print(json.dumps(row))
    if args.expect is not None and row["relative_difference"] > args.tolerance:
        print(f"loss {loss:.8f} differs from the expected {args.expect:.8f} by more than "
              f"{args.tolerance:g} (relative)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
