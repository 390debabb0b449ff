#!/usr/bin/env bash
# Training throughput side by side, in one run on one GPU: toy, transformer-toy and the PyTorch
# Transformer of equal size (bench/torch_transformer.py) at sequence lengths 512 .. 32768, and
# hydra-1.6b at 2K and 8K; the same tokens per step (32768) everywhere, BF16_MIXED, no recomputation
# unless a row says so. Each row is the median tokens/s of the steps after warm-up of one hydra-train
# run (metrics.jsonl), with model TFLOP/s, MFU and peak memory from the same lines.
#
# Usage: bench/throughput.sh BIN_DIR OUT_DIR [PART ...]
#   BIN_DIR  where hydra-train is (build/bin, or .gpu/bin on the GPU machine)
#   OUT_DIR  rows.jsonl (one JSON object a row) and each run's log
#   PART     toy, toy-parallel (workspace.write PARALLEL), toy-parallel-hydra (toy-parallel with the
#            HYDRA router objective), toy-ssd (toy-parallel with the scan in
#            the SSD form, ssm.form SSD), toy-paper (toy-parallel with the paper's SSM: one state per
#            channel, no convolution), transformer-toy (as shipped: cuDNN's fused attention where it
#            applies, deterministic), transformer-toy-cudnn (cuDNN's attention and its faster
#            backward: HYDRA_ATTENTION=cudnn, train.deterministic false), transformer-toy-ours (our
#            attention kernels: HYDRA_ATTENTION=ours), torch, hydra-1.6b, hydra-1.6b-forms (8K,
#            PARALLEL write, the selective scan and the SSD form), hydra-1.6b-ssd (its SSD row
#            alone) (default: toy,
#            toy-parallel, toy-ssd, transformer-toy, transformer-toy-cudnn, torch, hydra-1.6b)
# Environment: SEQS (default "512 1024 2048 4096 8192 16384 32768"), STEPS (30), WARMUP (5),
#   TOKENS (32768), PYTHON (python3); hydra-1.6b: BIG_STEPS (8) measured after BIG_WARMUP (4); its
#   part runs 2K and 8K, 8K with BLOCK recompute, and 8K with the workspace's PARALLEL write.
# Then: python3 bench/throughput_report.py OUT_DIR/rows.jsonl --gpu h200 writes the table, the plot and
# docs/bench/throughput-<gpu>-<date>.json.
set -uo pipefail
bin=${1:?usage: bench/throughput.sh BIN_DIR OUT_DIR [PART ...]}
out=${2:?usage: bench/throughput.sh BIN_DIR OUT_DIR [PART ...]}
shift 2
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(toy toy-parallel toy-ssd transformer-toy transformer-toy-cudnn torch hydra-1.6b)
seqs=${SEQS:-"512 1024 2048 4096 8192 16384 32768"}
steps=${STEPS:-30}
warmup=${WARMUP:-5}
tokens=${TOKENS:-32768}
python=${PYTHON:-python3}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
rows="$out/rows.jsonl"

# One hydra-train run; appends its row. Args: NAME CONFIG SEQ [--set ...]
train_row() {
  local name=$1 config=$2 seq=$3
  shift 3
  local batch=$((tokens / seq))
  [ "$batch" -lt 1 ] && batch=1
  local dir="$out/run-$name-$seq"
  rm -rf "$dir"
  local t0=$SECONDS
  "$bin/hydra-train" --config "$here/configs/$config.pbtxt" --out "$dir" --no-print-config --quiet \
    --set 'curriculum={}' --set train.device=cuda --set train.precision=BF16_MIXED --set train.recompute=NONE \
    --set train.seq_len="$seq" --set train.batch_size="$batch" --set train.steps=$((steps + warmup)) \
    --set train.lr.warmup_steps=2 --set train.eval_every=0 --set train.eval_batches=1 --set train.save_every=-1 \
    --set train.log_every=1 --set train.stats_every=1000000 "$@" > "$dir.log" 2>&1
  local rc=$?
  "$python" - "$dir/metrics.jsonl" "$name" "$seq" "$batch" "$warmup" "$rc" "$((SECONDS - t0))" "$dir.log" >> "$rows" <<'EOF'
import json, sys
path, name, seq, batch, warmup, rc, wall, log = sys.argv[1:]
row = {"model": name, "seq": int(seq), "batch": int(batch)}
try:
    lines = [json.loads(l) for l in open(path)]
except OSError:
    lines = []
steps = [l for l in lines if "tokens_per_s" in l][int(warmup):]
if int(rc) != 0 or not steps:
    tail = open(log, errors="replace").read().strip().splitlines()[-3:]
    row.update({"error": f"exit {rc}: " + " | ".join(tail)})
else:
    def med(key):
        v = sorted(l[key] for l in steps if key in l)
        return v[len(v) // 2] if v else None
    row.update({"tokens_per_s": med("tokens_per_s"), "step_ms": med("step_ms"), "model_tflops": med("model_tflops"),
                "mfu": med("mfu"), "peak_mb": max(l.get("memory.cuda_peak_mb", 0) for l in steps),
                "steps": len(steps), "loss_last": steps[-1]["loss"]})
row["wall_s"] = int(wall)
print(json.dumps(row))
EOF
  tail -n 1 "$rows"
}

for part in "${parts[@]}"; do
  case $part in
    toy | transformer-toy)
      for s in $seqs; do train_row "$part" "$part" "$s"; done ;;
    transformer-toy-cudnn)  # our Transformer on cuDNN's fused attention (an error where cuDNN refuses),
      # with its fastest backward (dQ through a float accumulator: train.deterministic false)
      for s in $seqs; do
        HYDRA_ATTENTION=cudnn train_row transformer-toy-cudnn transformer-toy "$s" --set train.deterministic=false
      done ;;
    transformer-toy-ours)  # our Transformer on our attention kernels (the default before session 46)
      for s in $seqs; do HYDRA_ATTENTION=ours train_row transformer-toy-ours transformer-toy "$s"; done ;;
    toy-parallel)
      for s in $seqs; do train_row toy-parallel toy "$s" --set model.workspace.write=PARALLEL; done ;;
    toy-parallel-hydra)  # the HYDRA router objective (the configs' default before session 25)
      for s in $seqs; do
        train_row toy-parallel-hydra toy "$s" --set model.workspace.write=PARALLEL --set model.moe.objective=HYDRA
      done ;;
    toy-ssd)
      for s in $seqs; do
        train_row toy-ssd toy "$s" --set model.workspace.write=PARALLEL --set model.ssm.form=SSD
      done ;;
    toy-paper)
      for s in $seqs; do
        train_row toy-paper toy "$s" --set model.workspace.write=PARALLEL --set model.ssm.d_state=1 \
          --set model.ssm.conv_width=0
      done ;;
    torch)
      for s in $seqs; do
        if ! "$python" "$here/bench/torch_transformer.py" --seq "$s" --tokens "$tokens" --steps "$steps" \
          --warmup "$warmup" >> "$rows" 2> "$out/torch-$s.log"; then
          echo "{\"model\": \"torch-transformer\", \"seq\": $s, \"error\": \"$(tail -n 1 "$out/torch-$s.log" | tr -d '"\\')\"}" >> "$rows"
        fi
        tail -n 1 "$rows"
      done ;;
    hydra-1.6b)  # about 1.5 s a step: fewer steps
      saved=("$steps" "$warmup")
      steps=${BIG_STEPS:-8}
      warmup=${BIG_WARMUP:-4}
      train_row hydra-1.6b hydra-1.6b 2048
      train_row hydra-1.6b hydra-1.6b 8192
      train_row hydra-1.6b-recompute hydra-1.6b 8192 --set train.recompute=BLOCK
      train_row hydra-1.6b-parallel hydra-1.6b 8192 --set model.workspace.write=PARALLEL
      steps=${saved[0]}
      warmup=${saved[1]} ;;
    hydra-1.6b-ssd)  # 8K, PARALLEL write, the SSD form
      saved=("$steps" "$warmup")
      steps=${BIG_STEPS:-8}
      warmup=${BIG_WARMUP:-4}
      train_row hydra-1.6b-ssd hydra-1.6b 8192 --set model.workspace.write=PARALLEL --set model.ssm.form=SSD
      steps=${saved[0]}
      warmup=${saved[1]} ;;
    hydra-1.6b-forms)  # 8K, PARALLEL write: the selective scan against the SSD form
      saved=("$steps" "$warmup")
      steps=${BIG_STEPS:-8}
      warmup=${BIG_WARMUP:-4}
      train_row hydra-1.6b-parallel hydra-1.6b 8192 --set model.workspace.write=PARALLEL
      train_row hydra-1.6b-ssd hydra-1.6b 8192 --set model.workspace.write=PARALLEL --set model.ssm.form=SSD
      steps=${saved[0]}
      warmup=${saved[1]} ;;
    *) echo "throughput.sh: unknown part '$part' (toy, toy-parallel, toy-parallel-hydra, toy-ssd, toy-paper, transformer-toy, transformer-toy-cudnn, transformer-toy-ours, torch, hydra-1.6b, hydra-1.6b-forms, hydra-1.6b-ssd)" >&2; exit 2 ;;
  esac
done
echo "throughput.sh: rows in $rows"
