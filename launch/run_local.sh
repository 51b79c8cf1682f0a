#!/usr/bin/env bash
# Single node, several processes (CPU) or one process per GPU.
#   launch/run_local.sh NPROCS CONFIG [--section.key VALUE ...]
# Open MPI binds each rank to cores; LibTorch's threads per rank default to cores / ranks
# on the node (override with OMP_NUM_THREADS). As root, Open MPI also needs
# --allow-run-as-root; more ranks than cores need --oversubscribe.
set -euo pipefail
n=${1:?usage: run_local.sh NPROCS CONFIG [overrides]}
cfg=${2:?usage: run_local.sh NPROCS CONFIG [overrides]}
shift 2
here=$(cd "$(dirname "$0")/.." && pwd)
extra=()
[[ $(id -u) -eq 0 ]] && extra+=(--allow-run-as-root)
(( n > $(nproc) )) && extra+=(--oversubscribe)
exec mpirun "${extra[@]}" -np "$n" --bind-to none "$here/build/shardtune" train --config "$cfg" "$@"
