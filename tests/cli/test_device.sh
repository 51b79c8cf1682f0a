#!/usr/bin/env bash
# parallel.device and parallel.backend through the real binary on a CPU LibTorch build: each
# refusal exits 2 with one line naming the key (and the library), and the explicit CPU
# choice trains as the default does, with no GPU figures in summary.json.
# usage: test_device.sh SHARDTUNE FAKE_LIBNCCL WORKDIR
set -u
st=$1 fake_nccl=$2 work=$3
rm -rf "$work" && mkdir -p "$work"
source "$(dirname "$0")/lib.sh"

cfg=$work/tiny.ini
tiny_run_ini 2 >"$cfg"
run=("$st" train --config "$cfg" --train.steps 2)

expect 2 "parallel.device=gpu is not one of auto, cpu, cuda" -- "${run[@]}" --parallel.device gpu --output.dir "$work/x"
expect 2 "parallel.backend=gloo is not one of auto, mpi, nccl" -- "${run[@]}" --parallel.backend gloo --output.dir "$work/x"
expect 2 "parallel.device=cuda: this shardtune is built against a LibTorch without CUDA" -- \
  "${run[@]}" --parallel.device cuda --output.dir "$work/x"
# No NCCL on this machine (the loader's real path): the library and the key are named.
expect 2 "parallel.backend=nccl: libnccl.so.2 cannot be loaded \(.*/nonexistent/libnccl.so.2.*\)" -- \
  env SHARDTUNE_NCCL_LIBRARY=/nonexistent/libnccl.so.2 "${run[@]}" --parallel.backend nccl --output.dir "$work/x"
# A library that loads (the stand-in) still needs a GPU to move.
expect 2 "parallel.backend=nccl needs parallel.device=cuda" -- \
  env SHARDTUNE_NCCL_LIBRARY="$fake_nccl" "${run[@]}" --parallel.backend nccl --output.dir "$work/x"
[[ ! -e "$work/x/summary.json" ]] && pass "nothing trained after a refusal" || failed "a refused run wrote a summary"

expect 0 "placement: device cpu .*backend mpi.*done: eval top-1" -- \
  "${run[@]}" --parallel.device cpu --parallel.backend mpi --output.dir "$work/cpu"
expect 0 "placement: device cpu .*backend mpi.*done: eval top-1" -- "${run[@]}" --output.dir "$work/auto"
cmp -s "$work/cpu/adapter/adapter_model.safetensors" "$work/auto/adapter/adapter_model.safetensors" \
  && pass "auto on a CPU build is the cpu run, bit for bit" || failed "auto and cpu adapters differ"
grep -q '"device_name"' "$work/cpu/summary.json" && failed "GPU figures in a CPU summary" || pass "no GPU figures on cpu"
finish
