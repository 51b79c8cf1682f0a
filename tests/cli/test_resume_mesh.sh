#!/usr/bin/env bash
# Resume on any mesh: a run stopped on one (dp, tp, pp) resumes on another (more or fewer ranks,
# other tp/pp) and ends with the uninterrupted one-process run's adapter; and a run from random
# initialisation (no model.checkpoint) on pp=2 / tp=2 equals one process. Tolerance 1e-3
# relative (fp32), as for the other meshes' training runs (test_sharding.sh, test_train.sh):
# another mesh sums in another order, and AdamW divides each gradient element by its own running
# RMS, so rounding in a small gradient becomes a relative change of its update. Measured worst:
# 1.4e-4, in blocks.3's lora_B_q (the last block computes only the cls token's query, so its q
# gradients are small), the same for an uninterrupted tp=2 run as for one resumed across meshes;
# resume itself adds nothing (same-mesh resumes are bit for bit, test_train.sh).
# usage: test_resume_mesh.sh SHARDTUNE TESTKIT MPIEXEC WORKDIR
set -u
st=$1 kit=$2 mpiexec=$3 work=$4
rm -rf "$work" && mkdir -p "$work"
source "$(dirname "$0")/lib.sh"

cfg=$work/tiny4.ini
tiny_run_ini 4 >"$cfg"
mpi() { local n=$1; shift; "$mpiexec" --oversubscribe -n "$n" "$@"; }
same() {  # A B WHAT: every tensor within 1e-3 relative
  if out=$("$kit" compare "$1/adapter/adapter_model.safetensors" "$2/adapter/adapter_model.safetensors" "*" 1e-3 2>&1); then
    pass "$3 ($out)"
  else
    failed "$3: $out"
  fi
}

expect 0 "done: eval top-1" -- "$st" train --config "$cfg" --output.dir "$work/ref"

# stop on (dp,tp,pp) = (1,2,2), resume on one process
expect 0 "stopping at step 3" -- mpi 4 "$st" train --config "$cfg" --output.dir "$work/m1" --parallel.tp 2 --parallel.pp 2 \
  --train.exit_interval 3
expect 0 "resumed from .*step_3 at step 3.*done" -- "$st" train --config "$cfg" --output.dir "$work/m1"
same "$work/m1" "$work/ref" "stopped on (1,2,2), resumed on 1 process"

# stop on one process, resume on (2,1,2)
expect 0 "stopping at step 3" -- "$st" train --config "$cfg" --output.dir "$work/m2" --train.exit_interval 3
expect 0 "resumed from .*step_3 at step 3.*done" -- mpi 4 "$st" train --config "$cfg" --output.dir "$work/m2" --parallel.pp 2
grep -q '"dp": 2' "$work/m2/summary.json" && grep -q '"pp": 2' "$work/m2/summary.json" && pass "m2 ran on dp=2 pp=2" || failed "m2 mesh"
same "$work/m2" "$work/ref" "stopped on 1 process, resumed on (2,1,2)"

# stop on (2,2,1), resume on (1,1,4)
expect 0 "stopping at step 3" -- mpi 4 "$st" train --config "$cfg" --output.dir "$work/m3" --parallel.tp 2 --train.exit_interval 3
expect 0 "resumed from .*step_3 at step 3.*done" -- mpi 4 "$st" train --config "$cfg" --output.dir "$work/m3" --parallel.pp 4
same "$work/m3" "$work/ref" "stopped on (2,2,1), resumed on (1,1,4)"

# From random initialisation (pretraining, no checkpoint): pp=2 and tp=2 draw the same backbone.
for method in lora vpt_deep adapter; do
  expect 0 "done: eval top-1" -- "$st" train --config "$cfg" --output.dir "$work/r_$method" --peft.method "$method"
  expect 0 "done: eval top-1" -- mpi 2 "$st" train --config "$cfg" --output.dir "$work/r_${method}_pp2" --peft.method "$method" --parallel.pp 2
  same "$work/r_${method}_pp2" "$work/r_$method" "$method from random init: pp=2 = one process"
done
expect 0 "done: eval top-1" -- mpi 2 "$st" train --config "$cfg" --output.dir "$work/r_lora_tp2" --parallel.tp 2
same "$work/r_lora_tp2" "$work/r_lora" "lora from random init: tp=2 = one process"

finish
