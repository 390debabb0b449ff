#!/usr/bin/env python3
"""NCCL's own collectives through PyTorch, on the same GPUs as hydra-bench-parallel --gpu: the reference
for its all-to-all and all-reduce rows. One process per GPU (torch.multiprocessing), f32 tensors;
all-to-all (all_to_all_single, equal splits) at the bytes sent per rank, all-reduce at the bytes
reduced. Bus bandwidth as nccl-tests: all-to-all bytes / t * (n-1)/n, all-reduce bytes / t * 2(n-1)/n.
CUDA events around each call, a barrier before each repeat, median of repeats after warm-up, the
slowest rank's median.
    python3 bench/nccl_reference.py [--gpus N] [--mib 16,64,128,256] [--json FILE]"""
import argparse
import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from torch_dist import time_ms


def worker(rank, n, mibs, out):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=n, device_id=torch.device("cuda", rank))
    rows = []
    for mib in mibs:
        numel = (mib << 20) // 4 // n * n
        send = torch.randn(numel, device="cuda")
        recv = torch.empty_like(send)
        ms = time_ms(lambda: dist.all_to_all_single(recv, send))
        rows.append({"bench": f"torch all_to_all_single {mib} MiB/rank", "ms": ms,
                     "busbw_GBps": numel * 4 / (ms * 1e-3) * (n - 1) / n / 1e9})
    for mib in mibs:
        t = torch.randn((mib << 20) // 4, device="cuda")
        ms = time_ms(lambda: dist.all_reduce(t))
        rows.append({"bench": f"torch all_reduce {mib} MiB", "ms": ms,
                     "busbw_GBps": t.numel() * 4 / (ms * 1e-3) * 2 * (n - 1) / n / 1e9})
    if rank == 0:
        version = ".".join(str(v) for v in torch.cuda.nccl.version())
        for r in rows:
            print(f"{r['bench']:<40} ms {r['ms']:.4g}  busbw_GBps {r['busbw_GBps']:.4g}")
        if out:
            with open(out, "w") as f:
                json.dump({"meta": {"ranks": n, "nccl": version, "torch": torch.__version__,
                                    "device": torch.cuda.get_device_name(0)}, "rows": rows}, f, indent=1)
        print(f"NCCL {version} through torch {torch.__version__}, {n} GPUs")
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    p.add_argument("--mib", default="16,64,128,256")
    p.add_argument("--json", default="")
    a = p.parse_args()
    if a.gpus < 2:
        raise SystemExit(f"nccl_reference.py: needs 2 or more GPUs, {a.gpus} visible")
    mp.spawn(worker, args=(a.gpus, [int(m) for m in a.mib.split(",")], a.json), nprocs=a.gpus)


if __name__ == "__main__":
    main()
