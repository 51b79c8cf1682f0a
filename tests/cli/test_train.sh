#!/usr/bin/env bash
# `shardtune train` end to end on Fashion-MNIST with a tiny ViT: outputs and their fields,
# bit-for-bit resume after train.exit_interval, dp=2 under mpiexec equal to one process,
# eval, SIGTERM, and failing fast on bad meshes. usage: test_train.sh SHARDTUNE TESTKIT MPIEXEC WORKDIR
set -u
st=$1 kit=$2 mpiexec=$3 work=$4
rm -rf "$work" && mkdir -p "$work"
source "$(dirname "$0")/lib.sh"

cfg=$work/tiny.ini
tiny_run_ini 2 >"$cfg"
mpi=("$mpiexec" --oversubscribe -n 2)

expect 0 "done: eval top-1" -- "$st" train --config "$cfg" --output.dir "$work/a"
for f in adapter/adapter_model.safetensors adapter/adapter_config.json metrics.jsonl summary.json; do
  [[ -s "$work/a/$f" ]] && pass "a/$f exists" || failed "a/$f missing"
done
for key in eval_top1 trainable_params total_params step_time_s images_per_sec peak_rss_mb grad_sync_bytes_per_step mesh precision frozen_gemm; do
  grep -q "\"$key\"" "$work/a/summary.json" && pass "summary has $key" || failed "summary lacks $key"
done
grep -q '"grad_sync_bytes_per_step": 0' "$work/a/summary.json" && pass "dp=1 syncs 0 bytes" || failed "dp=1 grad sync bytes"
# lora q,v r=8 on 2 blocks of dim 32: 2 x 2 x (8x32 + 32x8) = 2048, + head 5x32+5 = 165
grep -q '"trainable_params": 2213' "$work/a/summary.json" && pass "trainable params" || failed "trainable_params != 2213"
[[ $(grep -c '"loss"' "$work/a/metrics.jsonl") -eq 6 ]] && pass "6 step lines" || failed "metrics.jsonl step lines"
# train.profile_step: step 2's op trace (chrome://tracing JSON) on every rank, nothing for other steps.
expect 0 "done: eval top-1" -- "${mpi[@]}" "$st" train --config "$cfg" --output.dir "$work/prof" --train.steps 3 --train.profile_step 2 \
  --train.frozen_gemm blas --train.bf16_kernels false
for r in 0 1; do
  trace=$work/prof/profile_step_2_rank$r.json
  grep -q '"name": "aten::addmm"' "$trace" 2>/dev/null && grep -q '"ph": "X"' "$trace" && pass "rank $r op trace" || failed "no op trace $trace"
done
[[ $(ls "$work/prof" | grep -c '^profile_step_') -eq 2 ]] && pass "only the profiled step traced" || failed "extra traces: $(ls "$work/prof")"
grep -q '"frozen_gemm": "blas"' "$work/prof/summary.json" && pass "summary names the GEMM path" || failed "frozen_gemm not blas in summary"
grep -q '"bf16_kernels": false' "$work/prof/summary.json" && pass "summary says the bf16 kernels are off" || failed "bf16_kernels not false in summary"

# Stopped by exit_interval at step 3, resumed: bit-for-bit the uninterrupted adapter.
expect 0 "stopping at step 3" -- "$st" train --config "$cfg" --output.dir "$work/b" --train.exit_interval 3
[[ -f "$work/b/checkpoints/step_3/trainer_state.json" ]] && pass "checkpoint step_3" || failed "no checkpoint step_3"
expect 0 "resumed from .*step_3 at step 3.*done" -- "$st" train --config "$cfg" --output.dir "$work/b"
cmp -s "$work/a/adapter/adapter_model.safetensors" "$work/b/adapter/adapter_model.safetensors" \
  && pass "resumed adapter is bit-for-bit the uninterrupted one" || failed "resumed adapter differs"

# train.frozen_gemm=auto (the default) on GEMMs big enough to be measured (dim 64, 32 images of
# 17 tokens): the first run measures and records its choices, later runs read them from the
# cache (so a resumed run takes the same kernels and is bit-for-bit the uninterrupted one).
big=(--model.dim 64 --model.mlp_dim 256 --data.batch_size 32)
expect 0 "kernel choices: [1-9][0-9]* measured in .* 0 from the cache .*done: eval top-1" -- "$st" train --config "$cfg" --output.dir "$work/ka" "${big[@]}" --train.steps 4
/usr/bin/python3 - "$work/ka/summary.json" <<'EOF' && pass "summary records auto's kernel choices" || failed "summary lacks the kernel choices"
import json, sys
k = json.load(open(sys.argv[1]))["kernels"]
assert k["frozen_gemm"] == "auto" and k["tuning_s"] > 0, k
picks = {c["pick"] for c in k["choices"].values()}
assert k["choices"] and picks <= {"blas", "onednn", "onednn_matmul", "per_entry", "fp32", "bf16", "avx512", "torch"}, k
assert any(" fwd " in key for key in k["choices"]) and any(" bwd " in key for key in k["choices"]), k
EOF
expect 0 "kernel choices: 0 measured in 0.00 s, [1-9][0-9]* from the cache.*stopping at step 2" -- "$st" train --config "$cfg" --output.dir "$work/kb" "${big[@]}" --train.steps 4 --train.exit_interval 2
expect 0 "resumed from .*step_2 at step 2.*done" -- "$st" train --config "$cfg" --output.dir "$work/kb" "${big[@]}" --train.steps 4
cmp -s "$work/ka/adapter/adapter_model.safetensors" "$work/kb/adapter/adapter_model.safetensors" \
  && pass "auto: resumed adapter is bit-for-bit the uninterrupted one" || failed "auto: resumed adapter differs"
# train.frozen_gemm=onednn_matmul (oneDNN's matmul primitive on LibTorch's memory), where the
# build has oneDNN's headers (scripts/setup.sh installs libdnnl-dev); refused by name elsewhere.
out=$("$st" train --config "$cfg" --output.dir "$work/om" "${big[@]}" --train.steps 2 --train.frozen_gemm onednn_matmul 2>&1)
if grep -q "no oneDNN headers" <<<"$out"; then
  echo "skip: this build has no oneDNN headers (libdnnl-dev): onednn_matmul refused as it should be"
else
  grep -q "done: eval top-1" <<<"$out" && grep -q '"frozen_gemm": "onednn_matmul"' "$work/om/summary.json" \
    && pass "onednn_matmul trains and is named in the summary" || failed "onednn_matmul run: $(tail -3 <<<"$out")"
fi
# A corrupt kernel cache: a warning naming it, measured again, rewritten whole.
for f in "$XDG_CACHE_HOME"/shardtune/kernels-*.json; do printf '{"format_version": 1, "ho' >"$f"; done
expect 0 "ignoring the kernel-choice cache .*kernels-.*json.*kernel choices: [1-9][0-9]* measured.*done" -- "$st" train --config "$cfg" --output.dir "$work/kc" "${big[@]}" --train.steps 1
expect 0 "kernel choices: 0 measured in 0.00 s" -- "$st" train --config "$cfg" --output.dir "$work/kc2" "${big[@]}" --train.steps 1
expect 0 "kernel choices: [1-9][0-9]* measured.*\\(none\\)" -- "$st" train --config "$cfg" --output.dir "$work/kc3" "${big[@]}" --train.steps 1 --train.kernel_cache -
expect 2 "train.frozen_gemm=mkl must be auto, onednn, onednn_matmul or blas" -- "$st" train --config "$cfg" --output.dir "$work/g" --train.frozen_gemm mkl

# dp=2: the same samples, the same adapter (up to float reassociation).
expect 0 "done: eval top-1" -- "${mpi[@]}" "$st" train --config "$cfg" --output.dir "$work/c"
expect 0 "<= 0.001" -- "$kit" compare "$work/c/adapter/adapter_model.safetensors" "$work/a/adapter/adapter_model.safetensors" "*" 1e-3
grep -q '"grad_sync_bytes_per_step": 8852' "$work/c/summary.json" && pass "dp=2 syncs 4 x 2213 bytes" || failed "dp=2 grad sync bytes"
grep -q '"dp": 2' "$work/c/summary.json" && pass "mesh dp=2" || failed "mesh dp"
# Micro-batches accumulate to the same step (2 chunks of 8, and dp=2 x 2 chunks of 4).
expect 0 "done: eval top-1" -- "$st" train --config "$cfg" --output.dir "$work/mb" --parallel.microbatches 2
expect 0 "<= 0.001" -- "$kit" compare "$work/mb/adapter/adapter_model.safetensors" "$work/a/adapter/adapter_model.safetensors" "*" 1e-3
expect 0 "done: eval top-1" -- "${mpi[@]}" "$st" train --config "$cfg" --output.dir "$work/mb2" --parallel.microbatches 2
expect 0 "<= 0.001" -- "$kit" compare "$work/mb2/adapter/adapter_model.safetensors" "$work/a/adapter/adapter_model.safetensors" "*" 1e-3
# dp=4 (4 images a rank) too.
expect 0 "done: eval top-1" -- "$mpiexec" --oversubscribe -n 4 "$st" train --config "$cfg" --output.dir "$work/c4"
expect 0 "<= 0.001" -- "$kit" compare "$work/c4/adapter/adapter_model.safetensors" "$work/a/adapter/adapter_model.safetensors" "*" 1e-3
# A checkpoint made on dp=2 resumes on one process.
expect 0 "stopping at step 2" -- "${mpi[@]}" "$st" train --config "$cfg" --output.dir "$work/d" --train.exit_interval 2
expect 0 "resumed from .*step_2" -- "$st" train --config "$cfg" --output.dir "$work/d"
expect 0 "<= 0.001" -- "$kit" compare "$work/d/adapter/adapter_model.safetensors" "$work/a/adapter/adapter_model.safetensors" "*" 1e-3

# eval of the saved adapter reproduces the run's top-1.
expect 0 "eval top-1" -- "$st" eval --config "$cfg" --adapter "$work/a/adapter" --output.dir "$work/e"
run_top1=$(grep -o '"eval_top1": [0-9.e-]*' "$work/a/summary.json" | head -1 | awk '{print $2}')
eval_top1=$(grep -o '"eval_top1": [0-9.e-]*' "$work/e/eval.json" | awk '{print $2}')
[[ -n "$run_top1" && "$run_top1" == "$eval_top1" ]] && pass "eval top-1 $eval_top1 = run's" || failed "eval $eval_top1 vs run $run_top1"

# bf16 compute: frozen weights bf16, the adapter stays fp32 and lands near the fp32 one.
expect 0 "done: eval top-1" -- "$st" train --config "$cfg" --output.dir "$work/bf" --train.precision bf16
grep -q '"precision": "bf16"' "$work/bf/summary.json" && pass "summary says bf16" || failed "bf16 precision field"
grep -q '"F32"' <(head -c 4096 "$work/bf/adapter/adapter_model.safetensors") && ! grep -q '"BF16"' <(head -c 4096 "$work/bf/adapter/adapter_model.safetensors") \
  && pass "bf16 run's adapter is fp32" || failed "bf16 adapter dtype"
# The bf16 loss curve tracks fp32's: every step's loss within 1%.
paste <(grep -o '"loss":[0-9.e-]*' "$work/a/metrics.jsonl" | cut -d: -f2) <(grep -o '"loss":[0-9.e-]*' "$work/bf/metrics.jsonl" | cut -d: -f2) \
  | awk '{ d = ($1 - $2) / $1; if (d < 0) d = -d; if (d > 0.01) bad = 1; n++ } END { exit (bad || n != 6) }' \
  && pass "bf16 losses within 1% of fp32" || failed "bf16 losses drift from fp32"

# SIGTERM: finish the step, checkpoint, exit 0.
"$st" train --config "$cfg" --output.dir "$work/f" --train.steps 100000 --data.batch_size 64 >"$work/f.log" 2>&1 &
pid=$!
for _ in $(seq 50); do grep -q "train: vit" "$work/f.log" 2>/dev/null && break; sleep 0.2; done
sleep 1; kill -TERM $pid; wait $pid; rc=$?
[[ $rc -eq 0 ]] && grep -q "stopping at step .* (signal)" "$work/f.log" && ls "$work/f/checkpoints" | grep -q step_ \
  && pass "SIGTERM: checkpoint and exit 0" || { failed "SIGTERM (exit $rc)"; tail -5 "$work/f.log"; }

# Failing fast: one line naming the key, non-zero exit, every rank ends.
expect 2 "parallel.tp=3 x parallel.pp=1 = 3 does not divide the world size 2" -- "${mpi[@]}" "$st" train --config "$cfg" --output.dir "$work/g" --parallel.tp 3
expect 2 "data.batch_size=15 is not divisible by dp=2" -- "${mpi[@]}" "$st" train --config "$cfg" --output.dir "$work/g" --data.batch_size 15
expect 2 "data.classes=0-4 has 5 classes" -- "$st" train --config "$cfg" --output.dir "$work/g" --model.num_classes 7
expect 1 "nowhere/train-images-idx3-ubyte.gz: cannot open" -- "$st" train --config "$cfg" --output.dir "$work/g" --data.root "$work/nowhere"
expect 1 "the loss is .* at step 1" -- "$st" train --config "$cfg" --output.dir "$work/h" --data.std 1e-38 --data.mean 1e38
# The checkpoint is checked from its header on every rank before any collective.
"$st" init --config "$cfg" --model.dim 64 --out "$work/wide.safetensors" >/dev/null 2>&1
expect 1 "missing.safetensors: cannot open" -- "${mpi[@]}" "$st" train --config "$cfg" --output.dir "$work/g" --model.checkpoint "$work/missing.safetensors"
expect 1 "wide.safetensors does not fit the model: .*shape mismatch for pos_embed: expected \[1, 17, 32\], found \[1, 17, 64\]" -- \
  "${mpi[@]}" "$st" train --config "$cfg" --output.dir "$work/g" --model.checkpoint "$work/wide.safetensors"
expect 2 "peft.method=loha is not a known method" -- "${mpi[@]}" "$st" train --config "$cfg" --output.dir "$work/g" --peft.method loha
expect 2 "model.heads=4 is not divisible by parallel.tp=3" -- "$mpiexec" --oversubscribe -n 3 "$st" train --config "$cfg" --output.dir "$work/g" --parallel.tp 3
expect 2 "model.mlp_dim=66 is not divisible by parallel.tp=4" -- "$mpiexec" --oversubscribe -n 4 "$st" train --config "$cfg" --output.dir "$work/g" --parallel.tp 4 --model.mlp_dim 66
expect 2 "the argument \('maybe'\) for option '--train.bf16_kernels' is invalid" -- "$st" train --config "$cfg" --output.dir "$work/g" --train.bf16_kernels maybe
expect 2 "train.profile_step=-1 must be 0" -- "$st" train --config "$cfg" --output.dir "$work/g" --train.profile_step -1
expect 2 "model.depth=2 is less than parallel.pp=4" -- "$mpiexec" --oversubscribe -n 4 "$st" train --config "$cfg" --output.dir "$work/g" --parallel.pp 4
expect 2 "peft.targets: pattern 'attn.qvk' matches no module" -- "${mpi[@]}" "$st" train --config "$cfg" --output.dir "$work/g" --peft.targets attn.qvk

finish
