#!/bin/bash
# Dead and stopped ranks under mpirun: tiny trains on two data-parallel ranks (MPI) with a checkpoint
# every 20 steps. Once one is published:
#   - dead: rank 1 is SIGKILLed. The job must end within 60 s with a non-zero exit, the published
#     checkpoints must verify, and --resume auto on two ranks must train on from the newest;
#   - stopped: rank 1 is SIGSTOPped (a hung node). Rank 0's next collective must time out after
#     parallel.timeout_s (10 s), naming rank 1 as the one that did not arrive, and the job must end
#     with a non-zero exit instead of hanging.
#
#   tests/faults/dead_ranks.sh BIN_DIR MPIEXEC
set -uo pipefail
bin=${1:?usage: dead_ranks.sh BIN_DIR MPIEXEC}
mpiexec=${2:?usage: dead_ranks.sh BIN_DIR MPIEXEC}
root=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d /tmp/hydra-ranks.XXXXXX)
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 HYDRA_NUM_THREADS=1
cleanup() {
  pkill -CONT -f -- "$work/" 2> /dev/null
  pkill -9 -f -- "$work/" 2> /dev/null
  [ -n "${HYDRA_TEST_KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT
args=(--config "$root/configs/tiny.pbtxt" --quiet --no-print-config --set 'curriculum={}'
      --set train.seq_len=64 --set train.batch_size=2 --set train.eval_every=0
      --set train.eval_batches=1 --set train.save_every=20 --set parallel.dp=2
      --set parallel.comm=MPI --set parallel.timeout_s=10)
fail() { echo "FAILED: $*"; [ -f "$work/log" ] && tail -n 20 "$work/log"; exit 1; }

# Starts a long run in the background (pid in $job); waits for its first checkpoint.
start() {
  run=$1
  "$mpiexec" --oversubscribe -np 2 "$bin/hydra-train" "${args[@]}" --set train.steps=100000 \
    --out "$run" > "$work/log" 2>&1 &
  job=$!
  for _ in $(seq 600); do
    [ -e "$run/checkpoints/step-00000020/manifest.pb" ] && return 0
    kill -0 "$job" 2> /dev/null || fail "the run ended before its first checkpoint"
    sleep 0.1
  done
  fail "no checkpoint within 60 s"
}
# The pid of world rank $2 of the run in directory $1 (Open MPI tells each rank its number).
rank_pid() {
  for p in $(pgrep -f -- "hydra-train.*--out $1"); do
    if tr '\0' '\n' < "/proc/$p/environ" 2> /dev/null | grep -qx "OMPI_COMM_WORLD_RANK=$2"; then
      echo "$p"
      return
    fi
  done
}
# Waits up to $1 s for the background job to end; sets $rc and $took.
await() {
  local t0=$SECONDS
  while kill -0 "$job" 2> /dev/null; do
    [ $((SECONDS - t0)) -gt "$1" ] && fail "the job still runs $1 s later: it hangs"
    sleep 0.2
  done
  { wait "$job"; } 2> /dev/null
  rc=$?
  took=$((SECONDS - t0))
}

# Dead rank.
start "$work/dead"
pid=$(rank_pid "$work/dead" 1)
[ -n "$pid" ] || fail "rank 1's process not found"
kill -9 "$pid"
await 60
[ "$rc" != 0 ] || fail "the job exited 0 after rank 1 was killed"
n=0
for c in "$work"/dead/checkpoints/step-*; do
  [ -e "$c/manifest.pb" ] || continue
  "$bin/hydra-ckpt" verify "$c" > /dev/null 2>&1 || fail "$c does not verify after the kill"
  newest=$c
  n=$((n + 1))
done
step=$((10#${newest##*step-}))
"$mpiexec" --oversubscribe -np 2 "$bin/hydra-train" "${args[@]}" --out "$work/dead" --resume auto \
  --steps $((step + 10)) > "$work/log" 2>&1 || fail "--resume auto after the dead rank"
grep -q "\"step\": $((step + 10))," "$work/dead/metrics.jsonl" || fail "the resumed run did not reach step $((step + 10))"
echo "dead rank: the job ended in ${took} s (exit $rc); $n checkpoints verified; resumed from step $step to $((step + 10))"

# Stopped rank.
start "$work/stopped"
pid=$(rank_pid "$work/stopped" 1)
[ -n "$pid" ] || fail "rank 1's process not found"
kill -STOP "$pid"
await 90
kill -CONT "$pid" 2> /dev/null
[ "$rc" != 0 ] || fail "the job exited 0 with rank 1 stopped"
grep -q "did not complete within 10 s: rank 1 did not reach it" "$work/log" ||
  fail "rank 0's timeout does not name rank 1"
echo "stopped rank: rank 0 timed out naming rank 1; the job ended in ${took} s (exit $rc)"
