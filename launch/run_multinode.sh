#!/usr/bin/env bash
# Several nodes over mpirun and a hostfile ("node01 slots=8" a line).
#   launch/run_multinode.sh HOSTFILE NPROCS CONFIG [--section.key VALUE ...]
# Ranks are placed by node (--map-by ppr:SLOTS:node), so tensor-parallel groups (adjacent
# ranks) stay inside a node. Environment that matters, forwarded with -x:
#   OMP_NUM_THREADS         LibTorch threads per rank (CPU runs)
#   NCCL_SOCKET_IFNAME      network interface NCCL uses for bootstrap (GPU runs)
#   NCCL_IB_HCA             InfiniBand adapters NCCL may use
#   NCCL_DEBUG=WARN|INFO    NCCL logging
#   OMPI_MCA_btl_tcp_if_include / OMPI_MCA_oob_tcp_if_include   Open MPI's interfaces
set -euo pipefail
hosts=${1:?usage: run_multinode.sh HOSTFILE NPROCS CONFIG [overrides]}
n=${2:?usage: run_multinode.sh HOSTFILE NPROCS CONFIG [overrides]}
cfg=${3:?usage: run_multinode.sh HOSTFILE NPROCS CONFIG [overrides]}
shift 3
here=$(cd "$(dirname "$0")/.." && pwd)
exec mpirun --hostfile "$hosts" -np "$n" --map-by node --bind-to none \
  -x OMP_NUM_THREADS -x NCCL_SOCKET_IFNAME -x NCCL_IB_HCA -x NCCL_DEBUG -x LD_LIBRARY_PATH \
  "$here/build/shardtune" train --config "$cfg" "$@"
