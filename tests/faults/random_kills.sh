#!/bin/bash
# Kills at random instants, a fixed list of seeds: tiny trains 12 steps, a checkpoint every 2 steps
# written in the background onto a slowed disk (HYDRA_TEST_SLOW_WRITE_MS), and each case SIGKILLs it
# a fraction (10% to 90%) of an unkilled run's length that its seed draws, so that kills land in
# start-up, steps, background writes and around publishes. After each kill: every published checkpoint verifies
# (hydra-ckpt verify), --resume auto reaches step 12, the metrics hold each step exactly once, and
# the final checkpoint equals the unkilled run's bit for bit (every tensor's CRC32C). A kill before
# the first publish (a .tmp at most, which may hold its manifest already) resumes from step 0.
#
#   tests/faults/random_kills.sh BIN_DIR        (HYDRA_FAULT_SEEDS="1 2 3" runs other seeds)
set -uo pipefail
bin=${1:?usage: random_kills.sh BIN_DIR}
root=$(cd "$(dirname "$0")/../.." && pwd)
seeds=${HYDRA_FAULT_SEEDS:-"11 12 13 14 15 16 17 18 19 20"}
work=$(mktemp -d /tmp/hydra-kills.XXXXXX)
[ -n "${HYDRA_TEST_KEEP:-}" ] || trap 'rm -rf "$work"' EXIT
export HYDRA_NUM_THREADS=1 HYDRA_TEST_SLOW_WRITE_MS=120
args=(--config "$root/configs/tiny.pbtxt" --quiet --no-print-config --set 'curriculum={}'
      --set train.steps=12 --set train.seq_len=64 --set train.batch_size=2 --set train.eval_every=0
      --set train.eval_batches=1 --set train.save_every=2 --set train.keep_last=2)
fail() { echo "FAILED: $*"; exit 1; }
# The CRC32C of every tensor of a run's step-12 checkpoint, one "name crc" a line.
crcs() {
  "$bin/hydra-ckpt" inspect "$1/checkpoints/step-00000012" --json - | python3 -c '
import json, sys
for t in json.load(sys.stdin)["tensors"]:
    print(t["name"], " ".join(str(r["crc32c"]) for r in t["records"]))'
}

start=$(date +%s%N)
"$bin/hydra-train" "${args[@]}" --out "$work/reference" > "$work/reference.log" 2>&1 ||
  fail "the unkilled run: $(tail -n 3 "$work/reference.log")"
span_ms=$(( ($(date +%s%N) - start) / 1000000 ))
crcs "$work/reference" > "$work/reference.crc" || fail "inspecting the unkilled run"
[ -s "$work/reference.crc" ] || fail "no tensors in the unkilled run's checkpoint"
echo "unkilled run: ${span_ms} ms"

for seed in $seeds; do
  # The seed fixes the instant as a fraction of the unkilled run's length.
  permille=$(python3 -c "import random; print(random.Random($seed).randrange(1000))")
  delay_ms=$(( (100 + permille * 8 / 10) * span_ms / 1000 ))  # 10% to 90% of the way
  run="$work/run-$seed"
  "$bin/hydra-train" "${args[@]}" --out "$run" > "$run.log" 2>&1 &
  pid=$!
  sleep "$(printf '%d.%03d' $((delay_ms / 1000)) $((delay_ms % 1000)))"
  kill -9 "$pid" 2> /dev/null
  { wait "$pid"; } 2> /dev/null
  rc=$?
  mid_save=$(find "$run/checkpoints" -maxdepth 1 -name '*.tmp' 2> /dev/null | wc -l)
  published=()
  for c in "$run"/checkpoints/step-*; do  # a .tmp may hold its manifest: it is not published
    [[ $c != *.tmp ]] && [ -e "$c/manifest.pb" ] && published+=("$c")
  done
  for c in "${published[@]}"; do
    "$bin/hydra-ckpt" verify "$c" > "$run.verify" 2>&1 ||
      fail "seed $seed (killed at ${delay_ms} ms): $c does not verify: $(cat "$run.verify")"
  done
  if [ -e "$run/checkpoints/step-00000012/manifest.pb" ]; then
    :  # killed after the last publish: nothing to resume
  elif [ ! -e "$run/config.pbtxt" ] && [ ! -e "$run/metrics.jsonl" ] && [ ! -d "$run/checkpoints" ]; then
    # killed before the run wrote anything: a new run (launch/slurm/run.sh decides the same way)
    "$bin/hydra-train" "${args[@]}" --out "$run" > "$run.resume.log" 2>&1 ||
      fail "seed $seed: a new run after the kill: $(tail -n 3 "$run.resume.log")"
  else  # from the newest published checkpoint, or from step 0 when none was published
    "$bin/hydra-train" "${args[@]}" --out "$run" --resume auto > "$run.resume.log" 2>&1 ||
      fail "seed $seed: --resume auto after the kill: $(tail -n 3 "$run.resume.log")"
  fi
  for s in $(seq 1 12); do
    n=$(grep -c "\"step\": $s," "$run/metrics.jsonl")
    [ "$n" = 1 ] || fail "seed $seed: metrics.jsonl holds step $s $n times"
  done
  crcs "$run" > "$run.crc" || fail "seed $seed: inspecting the resumed run"
  cmp -s "$work/reference.crc" "$run.crc" ||
    fail "seed $seed: the resumed run's step 12 differs from the unkilled run's: $(diff "$work/reference.crc" "$run.crc" | head -n 4)"
  last=none
  [ ${#published[@]} -gt 0 ] && last=$(basename "${published[${#published[@]} - 1]}")
  echo "seed $seed: killed at ${delay_ms} ms (${permille} permille; exit $rc), ${#published[@]} published ($last) verified, $mid_save unpublished .tmp; resumed to step 12 bit for bit"
done
