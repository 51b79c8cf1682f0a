#!/usr/bin/env bash
# Stop signals under fire: a training run that gets a flood of its own stop signal, aimed at
# every thread of the process (tgkill on each /proc/PID/task entry), still ends with exit 0 and
# a checkpoint that resumes bit for bit. fp32 with oneDNN's frozen GEMMs at dim 128 (K > 84:
# oneDNN 2.6.3's AVX-512 GEMM runs on a malloc'd stack there, where a signal handler on a
# compute thread corrupts the heap; common/signals.h), and bf16. Also Ctrl-C once and twice.
# usage: test_signals.sh SHARDTUNE SIGNAL_FLOOD WORKDIR
set -u
st=$1 flood=$2 work=$3
rm -rf "$work" && mkdir -p "$work"
source "$(dirname "$0")/lib.sh"

cfg=$work/wide.ini
cat >"$cfg" <<INI
[model]
arch = vit
image_size = 28
patch_size = 7
in_chans = 1
dim = 128
depth = 2
heads = 4
mlp_dim = 512
num_classes = 5
[peft]
method = lora
[data]
classes = 0-4
train_samples = 2048
val_samples = 0
eval_samples = 100
batch_size = 1024
[train]
steps = 3
lr = 0.01
warmup_steps = 2
seed = 4
frozen_gemm = onednn
INI

# Steps of 1,024 images (several seconds each): the flood has time to land inside the GEMMs
# (on the code before the signal thread, 3 runs of 3 aborted with "corrupted size vs. prev_size").

# Starts a run in the background; waits for its first step; floods it with SIGNAL for SECS.
flood_run() {  # NAME SIGNAL SECS [overrides...]
  local name=$1 sig=$2 secs=$3; shift 3
  "$st" train --config "$cfg" --output.dir "$work/$name" "$@" >"$work/$name.log" 2>&1 &
  local pid=$!
  for _ in $(seq 300); do grep -q "step 1/" "$work/$name.log" 2>/dev/null && break; sleep 0.05; done
  "$flood" "$pid" "$sig" "$secs" >"$work/$name.flood" 2>&1
  wait "$pid"
  echo $?
}

# bf16 does not take that GEMM; its steps are made shorter (a CPU without AVX-512 BF16 emulates it),
# and more of them: on a host with AVX-512 BF16 a 256-image step takes ~23 ms, and 3 of them
# ended before the flood's first signal was taken (a run that finished instead of stopping:
# failed once in a whole-suite run), so 30 steps leave the flood ~0.7 s to land in.
for precision in fp32 bf16; do
  run=(--train.precision "$precision")
  [[ $precision == bf16 ]] && run+=(--data.batch_size 256 --train.steps 30)
  expect 0 "done: eval top-1" -- "$st" train --config "$cfg" --output.dir "$work/full_$precision" "${run[@]}"
  rc=$(flood_run "flood_$precision" 15 4 "${run[@]}" --train.log_every 1)
  sent=$(grep -o '[0-9]* signals' "$work/flood_$precision.flood" | cut -d' ' -f1)
  echo "    $precision: $(cat "$work/flood_$precision.flood")"
  if [[ $rc -eq 0 ]] && grep -q "stopping at step .* (signal)" "$work/flood_$precision.log" && [[ ${sent:-0} -gt 100 ]]; then
    pass "$precision: ${sent} SIGTERMs to every thread: exit 0 with a checkpoint"
  else
    failed "$precision: flood run exit $rc after ${sent:-0} signals"; tail -5 "$work/flood_$precision.log" | sed 's/^/    /'
  fi
  expect 0 "resumed from .*step_[0-9]* at step [0-9]*.*done" -- "$st" train --config "$cfg" \
    --output.dir "$work/flood_$precision" "${run[@]}"
  cmp -s "$work/full_$precision/adapter/adapter_model.safetensors" "$work/flood_$precision/adapter/adapter_model.safetensors" \
    && pass "$precision: the resumed adapter is bit for bit the uninterrupted one" || failed "$precision: resumed adapter differs"
done

# Ctrl-C: the first asks for a stop, the second stops at once (exit 130, no new checkpoint).
# The second is sent once the signal thread has taken the first (its warning is in the log), so
# the two are not merged into one pending signal, and well inside the 1,024-image step.
"$st" train --config "$cfg" --output.dir "$work/int" --train.steps 100000 --train.log_every 1 >"$work/int.log" 2>&1 &
pid=$!
for _ in $(seq 300); do grep -q "step 1/" "$work/int.log" 2>/dev/null && break; sleep 0.05; done
kill -INT $pid
for _ in $(seq 500); do grep -q "Ctrl-C again" "$work/int.log" 2>/dev/null && break; sleep 0.01; done
kill -INT $pid; wait $pid; rc=$?
[[ $rc -eq 130 ]] && grep -q "second interrupt" "$work/int.log" && [[ ! -e "$work/int/checkpoints" ]] &&
  pass "Ctrl-C twice: exit 130 at once" ||
  { failed "Ctrl-C twice: exit $rc"; tail -5 "$work/int.log" | sed 's/^/    /'; }
# One Ctrl-C: a checkpoint and exit 0, as SIGTERM.
"$st" train --config "$cfg" --output.dir "$work/int1" --train.steps 100000 --train.log_every 1 --data.batch_size 128 >"$work/int1.log" 2>&1 &
pid=$!
for _ in $(seq 300); do grep -q "step 1/" "$work/int1.log" 2>/dev/null && break; sleep 0.05; done
kill -INT $pid; wait $pid; rc=$?
[[ $rc -eq 0 ]] && grep -q "stopping at step .* (signal)" "$work/int1.log" && pass "one Ctrl-C: checkpoint and exit 0" ||
  { failed "one Ctrl-C: exit $rc"; tail -5 "$work/int1.log" | sed 's/^/    /'; }

finish
