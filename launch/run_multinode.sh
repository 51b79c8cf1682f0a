#!/usr/bin/env bash
# Several nodes over mpirun and a hostfile ("node01 slots=8" a line).
#   launch/run_multinode.sh HOSTFILE NPROCS CONFIG [--section.key VALUE ...]
# Ranks are placed in blocks, consecutive ranks on one node: --map-by ppr:NPROCS/NODES:node
# when NPROCS divides evenly over the hostfile's nodes, else --map-by slot (each node's slots
# filled in order). Tensor-parallel groups (adjacent ranks) thus stay inside a node when the
# ranks per node are a multiple of parallel.tp; ShardTune logs every rank's node at start and
# warns when a tp group spans nodes. (--map-by node would deal ranks round robin and split
# every tp group.) Environment that matters:
#   MPIRUN_ARGS             extra mpirun options, e.g. "--mca btl tcp,self"
#   SHARDTUNE_MAP_BY        another --map-by value
#   SHARDTUNE               another binary than build/shardtune
# forwarded to the ranks with -x:
#   OMP_NUM_THREADS         LibTorch threads per rank (CPU runs)
#   NCCL_SOCKET_IFNAME      network interface NCCL uses for bootstrap (GPU runs)
#   NCCL_IB_HCA             InfiniBand adapters NCCL may use
#   NCCL_DEBUG=WARN|INFO    NCCL logging
#   OMPI_MCA_btl_tcp_if_include / OMPI_MCA_oob_tcp_if_include   Open MPI's interfaces
# A node that is lost mid-run ends the job: Open MPI names the lost daemon's node, and this
# script then prints "run_multinode.sh: lost node HOST (ranks A-B)". Run the same command
# again to resume from the last checkpoint (output.resume=auto, output.checkpoint_every).
set -euo pipefail
hosts=${1:?usage: run_multinode.sh HOSTFILE NPROCS CONFIG [overrides]}
n=${2:?usage: run_multinode.sh HOSTFILE NPROCS CONFIG [overrides]}
cfg=${3:?usage: run_multinode.sh HOSTFILE NPROCS CONFIG [overrides]}
shift 3
here=$(cd "$(dirname "$0")/.." && pwd)
[[ -r $hosts ]] || { echo "run_multinode.sh: cannot read the hostfile $hosts" >&2; exit 2; }
nodes=$(grep -cvE '^[[:space:]]*(#|$)' "$hosts" || true)
# The ranks each node gets, in hostfile order (blocks), to name a lost node's ranks.
declare -A ranks_of=()
map=slot
if (( nodes > 0 && n % nodes == 0 )); then
  map=ppr:$((n / nodes)):node
  i=0
  while read -r host _; do
    ranks_of[$host]="$((i * n / nodes))-$(((i + 1) * n / nodes - 1))" i=$((i + 1))
  done < <(grep -vE '^[[:space:]]*(#|$)' "$hosts")
fi
[[ -n ${SHARDTUNE_MAP_BY:-} ]] && ranks_of=()
extra=()
[[ $(id -u) -eq 0 ]] && extra+=(--allow-run-as-root)
read -ra user_args <<<"${MPIRUN_ARGS:-}"
forward=()  # only the variables that are set: mpirun warns about each unset one
for v in OMP_NUM_THREADS NCCL_SOCKET_IFNAME NCCL_IB_HCA NCCL_DEBUG LD_LIBRARY_PATH; do
  if [[ -n ${!v+x} ]]; then forward+=(-x "$v"); fi
done
errlog=$(mktemp "${TMPDIR:-/tmp}/run_multinode.XXXXXX")
trap 'rm -f "$errlog"' EXIT
# mpirun in the background so that this script's signals reach it (TERM, INT, HUP; USR1 and
# USR2, which mpirun forwards to the ranks); its stderr is shown and kept to name a lost node.
mpirun "${extra[@]}" --hostfile "$hosts" -np "$n" --map-by "${SHARDTUNE_MAP_BY:-$map}" --bind-to none "${user_args[@]}" \
  "${forward[@]}" "${SHARDTUNE:-$here/build/shardtune}" train --config "$cfg" "$@" 2> >(tee "$errlog" >&2) &
job=$!
for sig in TERM INT HUP USR1 USR2; do trap "kill -$sig $job 2>/dev/null" "$sig"; done
rc=0
while :; do
  wait "$job" && rc=0 || rc=$?
  kill -0 "$job" 2>/dev/null || break  # wait returned for a trapped signal: mpirun still runs
done
sleep 0.2  # tee's last lines
if (( rc != 0 )); then
  # Open MPI: "Remote daemon: [[J,0],D] on node HOST" when a node's daemon is lost.
  for host in $(sed -n 's/.*Remote daemon: .* on node \([^ ]*\).*/\1/p' "$errlog" | sort -u); do
    echo "run_multinode.sh: lost node $host (ranks ${ranks_of[$host]:-unknown: see the placement lines at start}); the job ended with exit $rc" >&2
  done
fi
exit "$rc"
