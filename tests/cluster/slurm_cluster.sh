#!/usr/bin/env bash
# A private one-node Slurm cluster on this machine, for tests: its own munged (own key and
# socket), slurmctld and slurmd on free ports, state, spool and logs in DIR; this node's real
# CPU count; select/cons_tres, MpiDefault=pmix, proctrack/linuxproc, task/none, no accounting.
#
#   tests/cluster/slurm_cluster.sh DIR COMMAND...   starts the cluster, runs COMMAND with
#                                                   SLURM_CONF set to it, stops the cluster
#   source tests/cluster/slurm_cluster.sh           (after common.sh) for slurm_cluster_start DIR,
#                                                   which exports SLURM_CONF; the daemons are
#                                                   stopped at exit (common.sh's trap)
# Needs root; installs slurmctld slurmd slurm-client munge slurm-wlm-basic-plugins when
# missing; skips (exit 77) when it cannot. Stops only the daemons it started, by pid, after
# cancelling every job of its cluster.

slurm_packages=(slurmctld slurmd slurm-client munge slurm-wlm-basic-plugins)

slurm_cluster_start() {
  local dir=$1 node cpus conf ctld_port d_port
  need_root
  ensure_packages "${slurm_packages[@]}" || skip "cannot install ${slurm_packages[*]}"
  compgen -G "/usr/lib/*/slurm-wlm/mpi_pmix.so" >/dev/null || skip "Slurm's PMIx plugin (slurm-wlm/mpi_pmix.so) is not installed"
  rm -rf "$dir" && mkdir -p "$dir"/{ctld,spool,munge}
  dir=$(cd "$dir" && pwd)
  chmod 700 "$dir/munge"
  node=$(hostname -s)
  cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc alone obeys OMP_NUM_THREADS
  ctld_port=$(free_port 1)
  d_port=$(free_port 2)
  while [[ $d_port == "$ctld_port" ]]; do d_port=$(free_port 3); done
  mungekey --create --keyfile="$dir/munge/munge.key" >/dev/null 2>&1 ||
    { dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none && chmod 400 "$dir/munge/munge.key"; }
  conf=$dir/slurm.conf
  cat >"$conf" <<CONF
ClusterName=st$$
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$d_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/ctld
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=pmix
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=600
SchedulerType=sched/builtin
KillWait=10
InactiveLimit=0
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF
  export SLURM_CONF=$conf
  munged --foreground --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/seed" \
    >"$dir/munge/munged.out" 2>&1 &
  started $!
  local i
  for i in $(seq 50); do [[ -S $dir/munge/munge.socket ]] && break; sleep 0.1; done
  [[ -S $dir/munge/munge.socket ]] || { echo "munged did not start:"; tail -5 "$dir/munge/munged.log" "$dir/munge/munged.out"; return 1; }
  slurmctld -D -f "$conf" >"$dir/slurmctld.out" 2>&1 &
  started $!
  slurmd -D -f "$conf" -N "$node" >"$dir/slurmd.out" 2>&1 &
  started $!
  on_exit slurm_cluster_cancel_jobs  # before the daemons above are stopped
  local state=""
  for i in $(seq 150); do
    state=$(sinfo -h -N -o %t 2>/dev/null | head -1)
    [[ $state == idle ]] && break
    sleep 0.2
  done
  if [[ $state != idle ]]; then
    echo "the Slurm node is '${state:-not listed}' after 30 s, not idle:"
    tail -5 "$dir/slurmctld.log" "$dir/slurmd.log" 2>/dev/null
    return 1
  fi
  echo "slurm cluster up: node $node, $cpus CPUs, slurmctld port $ctld_port, slurmd port $d_port, state in $dir"
}

# Cancels every job of this cluster and waits (up to 30 s) until none is left running, so
# that no slurmstepd or task outlives the daemons.
slurm_cluster_cancel_jobs() {
  [[ -n ${SLURM_CONF:-} ]] || return 0
  scancel --quiet --full --user="$(id -un)" 2>/dev/null || true
  local i
  for i in $(seq 60); do
    [[ -z $(squeue -h -t running,completing,pending,suspended -o %i 2>/dev/null) ]] && return 0
    sleep 0.5
  done
  echo "jobs still listed 30 s after scancel:"; squeue 2>&1 | head -5
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then  # run as a command: DIR COMMAND...
  set -euo pipefail
  source "$(dirname "$0")/common.sh"
  [[ $# -ge 2 ]] || { echo "usage: $0 DIR COMMAND..."; exit 2; }
  d=$1; shift
  slurm_cluster_start "$d"
  "$@"
fi
