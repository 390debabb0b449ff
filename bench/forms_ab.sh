#!/bin/bash
# The kernel forms chosen by environment switches, side by side on one GPU in one call (issue 17):
#   HYDRA_SCAN_FWD=chunked|auto    the selective scan's forward: chunked passes, or one pass with a
#                                  warp's lanes over time where it fills the device
#   HYDRA_ATTENTION=ours|auto      attention: our kernels, or cuDNN's fused attention where it applies
# For each switch: its GPU tests, its kernel rows of hydra-bench-gpu under both settings (alternating,
# twice), and whole training steps under both settings (alternating, twice: toy-parallel for the
# scan, transformer-toy with train.deterministic false for attention; BF16_MIXED, 32,768 tokens a
# step, 40 steps, the median tokens/s of the last 32). Prints a table last; everything is also
# written under OUT_DIR.
#
# Usage: bash bench/forms_ab.sh BIN_DIR OUT_DIR [scan] [attention]
#   BIN_DIR holds hydra-train, hydra-bench-gpu and test_gpu (e.g. .gpu/bin after gpu/bundle.sh).
#   SEQS (default "8192 2048"), STEPS (40) and WARMUP (8) change the training runs.
set -uo pipefail
bin=${1:?usage: bench/forms_ab.sh BIN_DIR OUT_DIR [scan] [attention]}
out=${2:?usage: bench/forms_ab.sh BIN_DIR OUT_DIR [scan] [attention]}
shift 2
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(scan attention)
seqs=${SEQS:-"8192 2048"}
steps=${STEPS:-40}
warmup=${WARMUP:-8}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
table="$out/table.txt"
: > "$table"

# train NAME CONFIG SEQ SWITCH VALUE RUN [--set ...]: one run, one table row.
train() {
  local name=$1 config=$2 seq=$3 switch=$4 value=$5 run=$6
  shift 6
  local dir="$out/run-$name-$seq-$value-$run"
  rm -rf "$dir"
  env "$switch=$value" "$bin/hydra-train" --config "$here/configs/$config.pbtxt" --out "$dir" \
    --no-print-config --quiet --set 'curriculum={}' --set train.device=cuda \
    --set train.precision=BF16_MIXED --set train.recompute=NONE --set train.lr.warmup_steps=2 \
    --set train.eval_every=0 --set train.eval_batches=1 --set train.save_every=-1 \
    --set train.log_every=1 --set train.stats_every=1000000 --set train.steps="$steps" \
    --set train.seq_len="$seq" --set train.batch_size=$((32768 / seq)) "$@" > "$dir.log" 2>&1
  local rc=$?
  python3 - "$dir/metrics.jsonl" "$name seq $seq $switch=$value run $run" "$warmup" "$rc" "$dir.log" \
    >> "$table" <<'EOF'
import json, sys
path, label, warmup, rc, log = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
try:
    rows = [json.loads(l) for l in open(path) if '"tokens_per_s"' in l][warmup:]
except OSError:
    rows = []
if rc != "0" or not rows:
    tail = " | ".join(open(log, errors="replace").read().strip().splitlines()[-2:])
    print(f"{label:58s} failed (exit {rc}): {tail}")
else:
    v = sorted(r["tokens_per_s"] for r in rows)
    print(f"{label:58s} {v[len(v) // 2] / 1e3:9.1f}K tokens/s  ({len(v)} steps, last loss {rows[-1]['loss']:.4f})")
EOF
  tail -n 1 "$table"
}

# bench SWITCH ONLY: hydra-bench-gpu's rows named ONLY under both settings, alternating, twice.
bench() {
  local switch=$1 only=$2 a=$3 b=$4
  for run in 1 2; do
    for value in "$a" "$b"; do
      echo "== $switch=$value run $run" >> "$out/bench-$switch.txt"
      env "$switch=$value" "$bin/hydra-bench-gpu" --only "$only" >> "$out/bench-$switch.txt" 2>&1
    done
  done
}

# ab SWITCH A B FILTER ONLY NAME CONFIG [--set ...]: one switch's tests, kernel rows and steps.
ab() {
  local switch=$1 a=$2 b=$3 filter=$4 only=$5 name=$6 config=$7
  shift 7
  "$bin/test_gpu" --gtest_filter="$filter" > "$out/test-$switch.txt" 2>&1
  echo "test_gpu $filter: $(grep -E '^\[  (PASSED|FAILED)' "$out/test-$switch.txt" | tr '\n' ' ')" >> "$table"
  bench "$switch" "$only" "$a" "$b"
  for run in 1 2; do
    for s in $seqs; do
      for value in "$a" "$b"; do train "$name" "$config" "$s" "$switch" "$value" "$run" "$@"; done
    done
  done
}

for part in "${parts[@]}"; do
  case $part in
    scan)
      ab HYDRA_SCAN_FWD chunked auto '*SelectiveScan*:*OptInKernelForms*' selective_scan toy-parallel toy \
        --set model.workspace.write=PARALLEL ;;
    attention)  # deterministic off: cuDNN's faster backward (ours has one form either way)
      # cuDNN's own reason for any refusal goes to the logs (it logs only errors: no cost).
      export CUDNN_LOGERR_DBG=1 CUDNN_LOGDEST_DBG=stderr
      ab HYDRA_ATTENTION ours auto '*Attention*:*OptInKernelForms*' attention transformer-toy transformer-toy \
        --set train.deterministic=false ;;
    *) echo "forms_ab.sh: unknown part '$part' (scan, attention)" >&2; exit 2 ;;
  esac
done
echo "== forms_ab.sh: $out"
cat "$table"
grep -hE "^==|selective_scan|attention \[" "$out"/bench-*.txt 2>/dev/null
