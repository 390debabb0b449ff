#!/bin/bash
# The multi-GPU check of data, expert and sequence parallelism on one host with N GPUs (default 2):
#   1. the communicator and grid tests under NCCL (test_parallel, test_model_parallel's GPU grids);
#   2. hydra-bench-parallel --gpu, with NCCL's own all-to-all / all-reduce (bench/nccl_reference.py)
#      and PyTorch DDP on the same stack (bench/ddp_reference.py) as references, when PyTorch is there;
#   3. the all-reduce overlap again with NCCL limited to 4 and 8 blocks per collective (NCCL_MAX_CTAS);
#   4. 30 tiny BF16_MIXED steps on one GPU and on dp / ep / sp / dp+ZeRO-1 grids (losses side by side),
#      and the toy model's throughput on one GPU against dp = N.
#   bash bench/parallel_gpu_check.sh [OUT_DIR] [N] [PARTS]
# PARTS: a comma-separated subset of tests,bench,ctas,train,toy (default: all; tests,bench and
# ctas,train,toy each fit in 10 minutes on 2 H200s, by estimate).
# Binaries come from HYDRA_BIN (default build/bin) and HYDRA_TESTS (default build/tests). Logs and JSON
# go to OUT_DIR (default parallel-check); a summary goes to stdout. Keep NVLink multicast off where the
# host's operators ask for it (NCCL_NVLS_ENABLE=0, the default here).
set -u
out=${1:-parallel-check}
n=${2:-2}
parts=,${3:-tests,bench,ctas,train,toy},
want() { [[ $parts == *,$1,* ]]; }
bin=${HYDRA_BIN:-build/bin}
tests=${HYDRA_TESTS:-build/tests}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} HYDRA_SOURCE_DIR=${HYDRA_SOURCE_DIR:-$PWD}
M="mpirun --oversubscribe -x HYDRA_COMM_TIMEOUT_S=60 -x HYDRA_SOURCE_DIR -x NCCL_NVLS_ENABLE -np $n"
summary() { sed 's/\x1b\[[0-9;]*m//g' "$1" | grep -aE "^\[  (PASSED|FAILED) |^\[  FAILED  \] [A-Z]|did not complete|rank [0-9]+:" | head -12; }
losses() { grep -a '^step' "$1" | awk '{print $6}' | tr '\n' ' '; }
have_torch() { python3 -c 'import torch, sys; sys.exit(torch.cuda.device_count() < 2)' 2>/dev/null; }

nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -"$n"
date -u
if want tests; then
echo "== tests"
timeout 150 $M "$tests/test_parallel" > "$out/test_parallel.log" 2>&1; echo "test_parallel rc $?"; summary "$out/test_parallel.log"
timeout 180 $M "$tests/test_model_parallel" --gtest_filter='ModelParallelGpu*' > "$out/model_parallel_gpu.log" 2>&1
echo "test_model_parallel (GPU grids) rc $?"; summary "$out/model_parallel_gpu.log"
fi

if want bench; then
echo "== benchmarks"
timeout 240 $M "$bin/hydra-bench-parallel" --gpu --json "$out/bench.json" > "$out/bench.log" 2>&1
echo "hydra-bench-parallel rc $?"; cut -c1-230 "$out/bench.log"
if have_torch; then
  timeout 120 python3 bench/nccl_reference.py --gpus "$n" --json "$out/nccl_reference.json" 2>&1 | tail -10
  timeout 150 python3 bench/ddp_reference.py --gpus "$n" --json "$out/ddp_reference.json" 2>&1 | tail -3
else
  echo "(no PyTorch with $n GPUs: the NCCL and DDP references are skipped)"
fi
fi
if want ctas; then
for c in 4 8; do
  timeout 120 mpirun -x NCCL_NVLS_ENABLE -x NCCL_MAX_CTAS=$c -np "$n" "$bin/hydra-bench-parallel" --gpu --only all-reduce \
    --json "$out/allreduce_ctas$c.json" 2>&1 | grep -aE "reducer \(|ZeRO|then all-reduce" | cut -c1-60,120-280 | sed "s/^/NCCL_MAX_CTAS=$c: /"
done
fi

if want train; then
echo "== training (tiny, BF16_MIXED, 30 steps; losses at steps 10 / 20 / 30)"
C="--config configs/tiny.pbtxt --set curriculum={} --set train.steps=30 --set train.device=cuda --set train.log_every=10 --set train.precision=BF16_MIXED"
timeout 90 "$bin/hydra-train" $C --out "$out/tiny-one" > "$out/tiny-one.log" 2>&1; echo "one GPU rc $?: $(losses "$out/tiny-one.log")"
for g in dp ep sp; do
  timeout 120 $M "$bin/hydra-train" $C --out "$out/tiny-$g" --set parallel.$g=$n > "$out/tiny-$g.log" 2>&1
  echo "$g=$n rc $?: $(losses "$out/tiny-$g.log")"
done
timeout 120 $M "$bin/hydra-train" $C --out "$out/tiny-zero1" --set parallel.dp=$n --set parallel.zero1=true > "$out/tiny-zero1.log" 2>&1
echo "dp=$n + ZeRO-1 rc $?: $(losses "$out/tiny-zero1.log")"
fi

if want toy; then
echo "== toy throughput (BF16_MIXED, every path on, 2048 tokens per sequence, 40 steps)"
bash bench/toy_all.sh BF16_MIXED 40 16 2048
sed "s/batch_size: 16/batch_size: $((16 * n))/" /tmp/toy_all_BF16_MIXED.pbtxt > "$out/toy_dp.pbtxt"
timeout 120 "$bin/hydra-train" --config /tmp/toy_all_BF16_MIXED.pbtxt --device cuda --eval-every 0 --out "$out/toy-one" \
  > "$out/toy-one.log" 2>&1
echo "one GPU, 16 sequences: rc $? $(grep -a 'tok/s' "$out/toy-one.log" | tail -1 | cut -c1-110)"
timeout 150 $M "$bin/hydra-train" --config "$out/toy_dp.pbtxt" --device cuda --eval-every 0 --out "$out/toy-dp" \
  --set parallel.dp=$n > "$out/toy-dp.log" 2>&1
echo "dp=$n, $((16 * n)) sequences: rc $? $(grep -a 'tok/s' "$out/toy-dp.log" | tail -1 | cut -c1-110)"
grep -a '"comm.exposed_ms"' "$out/toy-dp/metrics.jsonl" 2>/dev/null | tail -1 | grep -oE '"comm[^,}]*' | head -4
fi
