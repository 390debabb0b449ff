#!/bin/bash
# The body of the Slurm templates (hydra-gpu.sbatch, hydra-cpu.sbatch): starts hydra-train on every
# task of the allocation with srun, resuming when OUT_DIR holds a run, and turns Slurm's
# warning signal (#SBATCH --signal=B:USR1@120) into a checkpoint and a requeue.
#
#   run.sh CONFIG OUT_DIR [hydra-train flags...]
#
# Environment (each optional):
#   HYDRA_BIN          hydra-train to run (default: $SLURM_SUBMIT_DIR/build/bin/hydra-train)
#   HYDRA_SRUN_MPI     srun's --mpi plugin: pmix (default), pmi2, or none (srun --mpi=list shows
#                      what the cluster offers)
#   HYDRA_SRUN_FLAGS   more srun flags, e.g. "--cpu-bind=cores"
# Ranks are placed in blocks (--distribution=block): consecutive ranks share a node, so the expert and
# sequence groups (ep x sp consecutive ranks, parallel/grid.h) stay inside a node when ep * sp divides
# the tasks per node, and only data parallelism crosses the network (docs/CLUSTER.md).
set -euo pipefail

config=${1:?usage: run.sh CONFIG OUT_DIR [hydra-train flags...]}
out=${2:?usage: run.sh CONFIG OUT_DIR [hydra-train flags...]}
shift 2
here=${SLURM_SUBMIT_DIR:-$(pwd)}
bin=${HYDRA_BIN:-$here/build/bin/hydra-train}
[ -x "$bin" ] || { echo "hydra slurm: $bin is not built (make, or set HYDRA_BIN)" >&2; exit 2; }
[ -f "$config" ] || { echo "hydra slurm: config $config not found (paths are relative to $(pwd))" >&2; exit 2; }

export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
export HYDRA_NUM_THREADS=${HYDRA_NUM_THREADS:-$OMP_NUM_THREADS}
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}

# A requeued job continues its run: from the newest checkpoint, or from step 0 when it was stopped
# before its first checkpoint was published (hydra-train --resume auto does both).
resume=()
for marker in config.pbtxt metrics.jsonl checkpoints; do
  [ -e "$out/$marker" ] && resume=(--resume auto)
done

# srun runs in the background so that this shell can pass Slurm's warning signal on to the ranks.
# shellcheck disable=SC2086
srun --mpi="${HYDRA_SRUN_MPI:-pmix}" --distribution=block --kill-on-bad-exit=1 ${HYDRA_SRUN_FLAGS:-} \
  "$bin" --config "$config" --out "$out" "${resume[@]}" "$@" &
pid=$!
on_warning() {
  echo "hydra slurm: time limit near: asking the ranks to checkpoint, then requeueing" >&2
  kill -USR1 "$pid"  # srun passes the signal on to every task
  wait "$pid" || true
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
}
trap on_warning USR1
rc=0
wait "$pid" || rc=$?
# The tasks themselves got SIGUSR1 or SIGTERM (a cluster that signals job steps, e.g. before a
# preemption): hydra-train saved a checkpoint and exited 128 + the signal (138, 143); requeue so
# that the job resumes from it. Any other failure (137: killed, e.g. out of memory) is not retried.
if { [ "$rc" -eq 138 ] || [ "$rc" -eq 143 ]; } && [ -n "${SLURM_JOB_ID:-}" ]; then
  echo "hydra slurm: the ranks stopped on signal $((rc - 128)) after a checkpoint; requeueing" >&2
  scontrol requeue "$SLURM_JOB_ID" && exit 0
fi
exit "$rc"
