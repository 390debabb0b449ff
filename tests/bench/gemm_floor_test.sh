#!/bin/bash
# bench/gemm_floor.py on a profile with known shapes: a FLOP-bound and a byte-bound GEMM, per-step
# division by the header's step count, the order (most time above the floor first) and the sums;
# a file without GEMM rows is an error that says how to get them.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d /tmp/hydra-gemm-floor.XXXXXX)
trap 'rm -rf "$work"' EXIT
cat > "$work/run.log" <<'LOG'
kernel profile (HYDRA_PROFILE): 10.0 ms in kernels, 40 launches; per step (2 steps after the first, evaluation included): 5.0 ms in kernels, 20 launches, 5.5 ms of wall time (kernels 91% of it; the rest the device waits for the host)
  kernel                          total ms     share    launches   us/launch
  gemm                                 1.4     14.0%          40        35.0
  gemm 8192x8192x8192 bf16 NN b1       4.0     40.0%           2      2000.0
  gemm 32768x56x768 bf16 NT b1         0.4      4.0%          20        20.0
LOG
python3 "$root/bench/gemm_floor.py" "$work/run.log" --peak-tflops 1000 --bandwidth-tbs 2 > "$work/out.txt"
fail() { echo "FAILED: $*"; cat "$work/out.txt"; exit 1; }
expect() { grep -qF -- "$1" "$work/out.txt" || fail "missing: $1"; }
# 2 * 8192^3 = 1.0995e12 FLOPs at 1e15/s: 1099.5 us; 3 * 8192^2 * 2 bytes at 2e12/s: 201.3 us
expect "| 8192x8192x8192 bf16 NN b1 | 1.0 | 2000.0 | 1099.5 | FLOPs | 1.82x | 0.900 |"
# bytes 2 * (32768 * 768 + 768 * 56 + 32768 * 56) = 54.1 MB at 2e12/s: 27.0 us, above its 20 us
expect "| 32768x56x768 bf16 NT b1 | 10.0 | 20.0 | 27.0 | bytes | 0.74x | -0.070 |"
[ "$(grep -n '8192x8192x8192' "$work/out.txt" | cut -d: -f1)" -lt "$(grep -n '32768x56x768' "$work/out.txt" | cut -d: -f1)" ] ||
  fail "rows not ordered by the time above the floor"
expect "GEMMs with a shape: 2.20 ms a step, their floors 1.37 ms (1.61x); above the floors 0.83 ms"
grep -v "^  gemm [0-9]" "$work/run.log" > "$work/none.log"
if python3 "$root/bench/gemm_floor.py" "$work/none.log" > "$work/err.txt" 2>&1; then fail "no error without rows"; fi
grep -qF "run with HYDRA_PROFILE=2" "$work/err.txt" || { cat "$work/err.txt"; fail "the error does not say how"; }
echo "gemm_floor_test: ok"
