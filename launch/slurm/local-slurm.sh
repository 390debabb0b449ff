#!/bin/bash
# A real Slurm on this one machine, to try the batch templates (and for tests/launch/slurm_test.sh):
# munge, slurmctld and slurmd with a configuration in a folder of their own. Needs root and
# Debian's slurm-wlm and munge (installed when missing: apt-get install slurm-wlm munge).
#
#   eval "$(launch/slurm/local-slurm.sh start DIR)"   # prints: export SLURM_CONF=DIR/slurm.conf
#   sbatch launch/slurm/hydra-cpu.sbatch configs/tiny.pbtxt runs/tiny-slurm --set parallel.dp=2
#   launch/slurm/local-slurm.sh stop DIR
#
# One node (this host) with its CPUs, one partition "debug" (the default), no GPUs, no accounting.
set -euo pipefail
cmd=${1:?usage: local-slurm.sh start|stop DIR}
dir=${2:?usage: local-slurm.sh start|stop DIR}

stop() {
  # Jobs first (their steps would outlive slurmd), then the daemons; the step daemons are ours, as
  # start refuses to run beside another Slurm.
  if [ -f "$dir/slurm.conf" ]; then
    SLURM_CONF=$dir/slurm.conf scancel --user="$(id -un)" 2> /dev/null || true
    for _ in $(seq 1 20); do
      [ -z "$(SLURM_CONF=$dir/slurm.conf squeue -h 2> /dev/null)" ] && break
      sleep 1
    done
  fi
  for f in "$dir"/slurmd.pid "$dir"/slurmctld.pid "$dir"/munged.pid; do
    [ -f "$f" ] && kill "$(cat "$f")" 2> /dev/null || true
  done
  pkill -x slurmstepd 2> /dev/null || true
  return 0
}

if [ "$cmd" = stop ]; then
  stop
  exit 0
fi
[ "$cmd" = start ] || { echo "local-slurm.sh: unknown command '$cmd' (start or stop)" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "local-slurm.sh: needs root (slurmd and munged run as root here)" >&2; exit 2; }
if ! command -v slurmctld > /dev/null || ! command -v munged > /dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends slurm-wlm munge > /dev/null
fi
if pgrep -x slurmctld > /dev/null || pgrep -x slurmd > /dev/null; then
  echo "local-slurm.sh: a Slurm is already running here (pids $(pgrep -x 'slurmctld|slurmd' | tr '\n' ' '));" \
    "stop it first (local-slurm.sh stop ITS_DIR, or kill those pids)" >&2
  exit 1
fi
mkdir -p "$dir"/state "$dir"/spool
dir=$(cd "$dir" && pwd)

# munge: the shared key and its socket (the default key when there is one).
if [ ! -S /run/munge/munge.socket.2 ]; then
  mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
  [ -f /etc/munge/munge.key ] || mungekey -c -k /etc/munge/munge.key > /dev/null 2>&1
  chown -R munge: /etc/munge /run/munge /var/lib/munge /var/log/munge 2> /dev/null || true
  chmod 400 /etc/munge/munge.key
  munged --force --pid-file="$dir"/munged.pid 2> /dev/null || munged --force
fi

host=$(hostname)
cpus=$(nproc)
cat > "$dir"/slurm.conf << CONF
ClusterName=hydra-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
NodeName=$host CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
export SLURM_CONF=$dir/slurm.conf
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 1 30); do
  if sinfo -h -o %t 2> /dev/null | grep -q idle; then
    echo "export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 1
done
echo "local-slurm.sh: the node did not come up within 30 s; see $dir/slurmctld.log and $dir/slurmd.log" >&2
stop
exit 1
