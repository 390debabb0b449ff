#!/bin/bash
# The Slurm templates on a real (one-machine) Slurm: launch/slurm/hydra-cpu.sbatch trains tiny with
# two ranks to completion; then a job whose time limit runs out mid-training checkpoints on Slurm's
# warning signal, requeues itself and resumes from that checkpoint. Skipped (exit 77) where Slurm
# cannot be started (not root, no slurm-wlm and no network to install it) or HYDRA_TEST_SLURM=0.
#
#   tests/launch/slurm_test.sh BIN_DIR
set -uo pipefail
bin=${1:?usage: slurm_test.sh BIN_DIR}
bin=$(cd "$bin" && pwd)
root=$(cd "$(dirname "$0")/../.." && pwd)
skip() { echo "SKIPPED: $*"; exit 77; }
fail() { echo "FAILED: $*"; for f in "$work"/*.out; do echo "== $f"; tail -n 20 "$f"; done; exit 1; }

[ "${HYDRA_TEST_SLURM:-1}" = 0 ] && skip "HYDRA_TEST_SLURM=0"
[ "$(id -u)" = 0 ] || skip "needs root to start munged, slurmctld and slurmd"
command -v slurmctld > /dev/null || command -v apt-get > /dev/null || skip "no slurm-wlm"
work=$(mktemp -d /tmp/hydra-slurm-test.XXXXXX)
cleanup() {
  "$root"/launch/slurm/local-slurm.sh stop "$work/slurm" > /dev/null 2>&1
  pkill -f "$work/run-" 2> /dev/null  # ranks a stopped slurmd left behind
  sleep 1
  rm -rf "$work" 2> /dev/null || true
}
[ -n "${HYDRA_TEST_KEEP:-}" ] || trap cleanup EXIT
if ! env_line=$("$root"/launch/slurm/local-slurm.sh start "$work/slurm" 2> "$work/start.log"); then
  # A Slurm that cannot start here (ports taken by another one, no packages) is not this test's
  # subject.
  skip "local Slurm did not start: $(tail -n 1 "$work/start.log")"
fi
eval "$env_line"

# Waits until job $1 has left the queue (or $2 seconds pass); prints its final state.
wait_job() {
  local job=$1 limit=$2 t=0 state
  while [ $t -lt "$limit" ]; do
    state=$(scontrol show job "$job" 2> /dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2)
    case $state in
      COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY) echo "$state"; return 0 ;;
    esac
    sleep 1
    t=$((t + 1))
  done
  echo "STUCK:$state"
}

cd "$root"
export HYDRA_BIN=$bin/hydra-train

# 1. Two ranks to the end: exit 0, a checkpoint, every step's metrics line.
job=$(sbatch --parsable --chdir="$root" -o "$work/done-%j.out" launch/slurm/hydra-cpu.sbatch \
  configs/tiny.pbtxt "$work/run-done" --set parallel.dp=2 --steps 40 --eval-every 0 \
  --set train.eval_batches=2) || fail "sbatch refused the CPU template"
state=$(wait_job "$job" 240)
[ "$state" = COMPLETED ] || fail "job $job ended $state (expected COMPLETED)"
[ -f "$work/run-done/checkpoints/step-00000040/manifest.pb" ] || fail "no checkpoint at step 40"
lines=$(wc -l < "$work/run-done/metrics.jsonl")
[ "$lines" -eq 40 ] || fail "metrics.jsonl has $lines lines, expected 40"
grep -q "2 ranks (dp=2 ep=1 sp=1, srun)" "$work"/done-*.out || fail "the ranks were not started by srun"
echo "ok: two ranks under srun trained to step 40 (job $job)"

# 2. The time limit runs out mid-training (-t 1: the warning 50 s before it): the job checkpoints,
# requeues and resumes; it is cancelled once the resumed leg has started.
job=$(sbatch --parsable --chdir="$root" -t 1 --signal=B:USR1@50 -o "$work/limit-%j.out" \
  launch/slurm/hydra-cpu.sbatch configs/tiny.pbtxt "$work/run-limit" --set parallel.dp=2 \
  --steps 100000 --set train.steps=100000 --set 'curriculum={}' --set train.seq_len=128 \
  --eval-every 0 --save-every 0) || fail "sbatch refused the CPU template with a time limit"
resumed="" held=0
for _ in $(seq 1 200); do
  if grep -q "resumed from" "$work"/limit-*.out 2> /dev/null; then resumed=yes; break; fi
  # Slurm holds a requeued job back (Reason=BeginTime, two minutes) while the old batch step winds
  # down: after 15 s of that, start it (earlier, the old step's exit could complete the new run).
  if scontrol show job "$job" 2> /dev/null | grep -q 'Reason=BeginTime'; then
    held=$((held + 1))
    [ "$held" -eq 15 ] && scontrol update JobId="$job" StartTime=now 2> /dev/null
  fi
  sleep 1
done
[ -n "$resumed" ] || scontrol show job "$job" > "$work/job.txt" 2>&1
scancel "$job" 2> /dev/null
wait_job "$job" 60 > /dev/null
[ -n "$resumed" ] || fail "job $job did not resume within 200 s"
grep -q "time limit near" "$work"/limit-*.out || fail "no warning signal reached the batch script"
grep -q "received SIGUSR1" "$work"/limit-*.out || fail "the ranks did not stop on SIGUSR1"
ckpt=$(ls -d "$work"/run-limit/checkpoints/step-* 2> /dev/null | head -n 1)
[ -n "$ckpt" ] || fail "no checkpoint written at the warning"
grep -q "resumed from .*$(basename "$ckpt")" "$work"/limit-*.out || fail "the resumed leg did not start from $ckpt"
echo "ok: the time limit's warning checkpointed at $(basename "$ckpt"), requeued and resumed (job $job)"
