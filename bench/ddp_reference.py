#!/usr/bin/env python3
"""PyTorch DDP on the stack hydra-bench-parallel's all-reduce part times, on the same GPUs: the
reference for the gradient reducer's exposed communication. One process per GPU, f32 with TF32 off,
a residual stack of LAYERS x (Linear(2048 -> 8192, no bias), ReLU, Linear(8192 -> 2048)) (48 layers:
1.611B parameters), 2048 tokens per rank, the same output gradient shape. Rows:
  backward alone           forward + backward under DDP's no_sync() (no communication)
  backward + DDP           forward + backward with DDP's bucketed all-reduce (bucket_cap_mb 25)
  exposed                  the difference
CUDA events around each step after a barrier, median of repeats after warm-up, the slowest rank's.
    python3 bench/ddp_reference.py [--gpus N] [--layers 48] [--tokens 2048] [--json FILE]"""
import argparse
import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from torch_dist import time_ms


class Block(torch.nn.Module):
    def __init__(self, d, ff):
        super().__init__()
        self.up = torch.nn.Linear(d, ff, bias=False)
        self.down = torch.nn.Linear(ff, d, bias=False)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


def worker(rank, n, layers, tokens, out):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29518")
    torch.cuda.set_device(rank)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dist.init_process_group("nccl", rank=rank, world_size=n, device_id=torch.device("cuda", rank))
    torch.manual_seed(1)
    model = torch.nn.Sequential(*[Block(2048, 8192) for _ in range(layers)]).cuda()
    params = sum(p.numel() for p in model.parameters())
    ddp = DDP(model, device_ids=[rank], bucket_cap_mb=25, gradient_as_bucket_view=True)
    x = torch.randn(tokens, 2048, device="cuda")
    gy = torch.randn(tokens, 2048, device="cuda")

    def step():
        ddp.zero_grad(set_to_none=False)
        ddp(x).backward(gy)

    def alone():
        with ddp.no_sync():
            ddp.zero_grad(set_to_none=False)
            ddp(x).backward(gy)

    t_alone = time_ms(alone, warmup=2)
    t_ddp = time_ms(step, warmup=2)
    if rank == 0:
        rows = [{"bench": f"torch backward alone (no_sync) {layers} layers, {params / 1e6:.0f}M params, {tokens} tokens/rank",
                 "ms": t_alone},
                {"bench": f"torch backward + DDP all-reduce (25 MB buckets) {layers} layers", "ms": t_ddp,
                 "exposed_ms": t_ddp - t_alone}]
        for r in rows:
            print(f"{r['bench']:<80} " + "  ".join(f"{k} {v:.4g}" for k, v in r.items() if k != "bench"))
        if out:
            with open(out, "w") as f:
                json.dump({"meta": {"ranks": n, "nccl": ".".join(str(v) for v in torch.cuda.nccl.version()),
                                    "torch": torch.__version__, "device": torch.cuda.get_device_name(0)},
                           "rows": rows}, f, indent=1)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--json", default="")
    a = p.parse_args()
    if a.gpus < 2:
        raise SystemExit(f"ddp_reference.py: needs 2 or more GPUs, {a.gpus} visible")
    mp.spawn(worker, args=(a.gpus, a.layers, a.tokens, a.json), nprocs=a.gpus)


if __name__ == "__main__":
    main()
