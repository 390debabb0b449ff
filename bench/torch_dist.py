"""Shared by the PyTorch reference benchmarks (nccl_reference.py, ddp_reference.py): timing of a
distributed step the way hydra-bench-parallel times its own (a barrier before each repeat, CUDA events
around the call, the median over repeats after warm-up, the slowest rank's median)."""
import torch
import torch.distributed as dist


def time_ms(fn, reps=10, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        dist.barrier()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    med = torch.tensor([times[len(times) // 2]], device="cuda")
    dist.all_reduce(med, op=dist.ReduceOp.MAX)
    return med.item()
