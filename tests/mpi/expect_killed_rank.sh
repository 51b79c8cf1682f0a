#!/usr/bin/env bash
# A rank that dies (SIGKILL, as the OOM killer does) ends the whole job within 30 s.
# usage: expect_killed_rank.sh MPIEXEC SHARDTUNE WORKDIR
set -u
mpiexec=$1 st=$2 work=$3
rm -rf "$work" && mkdir -p "$work"
"$mpiexec" --oversubscribe -n 2 "$st" train --output.dir "$work/run" --model.arch vit --model.image_size 28 \
  --model.patch_size 7 --model.in_chans 1 --model.dim 32 --model.depth 2 --model.heads 4 --model.mlp_dim 64 \
  --model.num_classes 10 --peft.method lora --data.dataset synthetic --data.batch_size 8 --train.steps 1000000 \
  >"$work/log" 2>&1 &
job=$!
for _ in $(seq 100); do grep -q "train: vit" "$work/log" && break; sleep 0.2; done
victim=$(pgrep -f "shardtune train --output.dir $work/run" | grep -v "^$job\$" | tail -1)
[[ -n "$victim" ]] || { echo "FAIL: no rank process found"; kill $job; exit 1; }
start=$(date +%s)
kill -9 "$victim"
for _ in $(seq 60); do kill -0 $job 2>/dev/null || break; sleep 0.5; done
wait $job; rc=$?
secs=$(( $(date +%s) - start ))
echo "job exit $rc, ${secs}s after killing pid $victim"
if kill -0 $job 2>/dev/null; then echo "FAIL: the job still runs"; pkill -f "$work/run"; exit 1; fi
[[ $rc -ne 0 && $secs -le 30 ]] || { echo "FAIL"; tail -5 "$work/log"; exit 1; }
! pgrep -f "shardtune train --output.dir $work/run" >/dev/null || { echo "FAIL: a rank survived"; pkill -f "$work/run"; exit 1; }
echo ok
