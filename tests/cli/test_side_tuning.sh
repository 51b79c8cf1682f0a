#!/usr/bin/env bash
# Side tuning (peft.method=lst) and the backbone-output cache, end to end:
# - an lst adapter trained on one process predicts the same logits on tp=2, pp=2 and
#   tp=2 x pp=2 meshes (1e-5), and eval reads it;
# - trained on pp=2 (gpipe and 1f1b) the pipeline sends [x | h] forward and only dh back:
#   summary.json's pipeline_bytes_per_step is exactly that;
# - train.cache_backbone: the adapter of a cached run is bit-identical to the uncached run's
#   (linear and lst, fp32), the cache's figures are in summary.json, dp=2 caches per rank;
# - bad input (a method that trains the backbone, timm_train, pp > 1, a cache too big for
#   train.cache_max_gb or a bound that is not positive, side keys out of range) is a usage error
#   naming the keys.
# usage: test_side_tuning.sh SHARDTUNE TESTKIT MPIEXEC WORKDIR
set -u
st=$1 kit=$2 mpiexec=$3 work=$4
rm -rf "$work" && mkdir -p "$work"
source "$(dirname "$0")/lib.sh"
mpi() { local n=$1; shift; "$mpiexec" --oversubscribe -n "$n" "$@"; }
field() { grep -o "\"$2\": [^,}]*" "$1" | head -1 | awk '{print $2}'; }

cfg=$work/tiny.ini
tiny_run_ini 4 >"$cfg"
expect 0 "wrote" -- "$st" init --config "$cfg" --out "$work/init.safetensors"
expect 0 "wrote 6 images" -- "$kit" make-input /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz \
  /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz 6 28 1 0.286,0.353 "$work/input.safetensors"
base=(train --config "$cfg" --model.checkpoint "$work/init.safetensors" --model.load_head false)
train=("${base[@]}" --output.resume never)
lst=(--peft.method lst)
pred=(predict --config "$cfg" --model.checkpoint "$work/init.safetensors" --input "$work/input.safetensors")

# --- one process, then every mesh reads the adapter --------------------------------------------
expect 0 "done: eval top-1" -- "$st" "${train[@]}" "${lst[@]}" --output.dir "$work/one" --peft.side_blocks "0,2-3"
expect 0 '"method": "lst"' -- cat "$work/one/adapter/adapter_config.json"
expect 0 "wrote logits \[6, 5\]" -- "$st" "${pred[@]}" --adapter "$work/one/adapter" --out "$work/one.logits.safetensors"
for mesh in "2 1" "1 2" "2 2"; do
  set -- $mesh
  expect 0 "wrote logits \[6, 5\]" -- mpi $(($1 * $2)) "$st" "${pred[@]}" --adapter "$work/one/adapter" \
    --parallel.tp "$1" --parallel.pp "$2" --out "$work/tp$1pp$2.logits.safetensors"
  expect 0 "<= 1e-05" -- "$kit" compare "$work/tp$1pp$2.logits.safetensors" "$work/one.logits.safetensors" logits 1e-5
done
expect 0 "eval top-1 .* \(lst adapter" -- "$st" eval --config "$cfg" --model.checkpoint "$work/init.safetensors" \
  --adapter "$work/one/adapter" --output.dir "$work/one_eval"
expect 2 "lst cannot be merged" -- "$st" merge --config "$cfg" --model.checkpoint "$work/init.safetensors" \
  --adapter "$work/one/adapter" --out "$work/merged.safetensors"

# --- pipeline traffic: [x | h] forward (32 + 4 channels), dh (4 channels) back -------------------
# batch 16, 17 tokens, fp32: forward 16 * 17 * 36 * 4 bytes, backward 16 * 17 * 4 * 4.
for schedule in gpipe 1f1b; do
  expect 0 "done: eval top-1" -- mpi 2 "$st" "${train[@]}" "${lst[@]}" --output.dir "$work/pp_$schedule" --parallel.pp 2 \
    --parallel.microbatches 2 --parallel.schedule "$schedule"
  expect 0 '"forward": 39168.0, *"backward": 4352.0' -- tr -d '\n' <"$work/pp_$schedule/summary.json"
done
cmp -s "$work/pp_gpipe/adapter/adapter_model.safetensors" "$work/pp_1f1b/adapter/adapter_model.safetensors" &&
  pass "gpipe and 1f1b give the same lst adapter" || failed "gpipe and 1f1b lst adapters differ"

# --- the backbone-output cache: bit-identical adapters ------------------------------------------
# 64 images, batches of 16, 3 epochs: the first epoch fills the cache, two more read it.
cache_run=(--data.train_samples 64 --data.val_samples 16 --train.epochs 3)
for method in linear lst; do
  for cache in false true; do
    expect 0 "done: eval top-1" -- "$st" "${train[@]}" --peft.method "$method" "${cache_run[@]}" \
      --train.cache_backbone "$cache" --output.dir "$work/cache_${method}_$cache"
  done
  cmp -s "$work/cache_${method}_false/adapter/adapter_model.safetensors" \
    "$work/cache_${method}_true/adapter/adapter_model.safetensors" &&
    pass "$method: the cached run's adapter is bit-identical" || failed "$method: cached and uncached adapters differ"
  expect 0 '"backbone_cache": \{ *"images": 64, .*"hits": 128, *"misses": 64' -- tr -d '\n' \
    <"$work/cache_${method}_true/summary.json"
done
# Stopped and resumed (output.resume=auto): the cache starts empty again. Stopped at an epoch's
# end (step 4 of 4-step epochs) the adapter is the uninterrupted cached run's, byte for byte;
# stopped inside an epoch (step 5), later batches mix cached samples with the 16 the resumed run
# never saw, the backbone runs on sub-batches of other shapes, and the adapter agrees within
# fp32 rounding (measured: 3.7e-8 relative), as documented.
for at in 4 5; do
  stop=("$st" "${base[@]}" "${lst[@]}" "${cache_run[@]}" --train.cache_backbone true --output.resume auto
        --output.dir "$work/cache_resumed_$at")
  expect 0 "stopping at step $at" -- "${stop[@]}" --train.exit_interval "$at"
  expect 0 "resumed from .*step_$at at step $at.*done: eval top-1" -- "${stop[@]}"
done
cmp -s "$work/cache_lst_true/adapter/adapter_model.safetensors" "$work/cache_resumed_4/adapter/adapter_model.safetensors" &&
  pass "stopped at an epoch's end and resumed: the uninterrupted cached adapter, bit for bit" ||
  failed "the cached run resumed at step 4 ends with another adapter"
expect 0 "<= 1e-05" -- "$kit" compare "$work/cache_resumed_5/adapter/adapter_model.safetensors" \
  "$work/cache_lst_true/adapter/adapter_model.safetensors" "*" 1e-5
# dp=2: each rank caches the samples it sees (a share of each epoch's batches).
expect 0 "done: eval top-1" -- mpi 2 "$st" "${train[@]}" "${lst[@]}" "${cache_run[@]}" --train.cache_backbone true \
  --output.dir "$work/cache_dp2"
expect 0 '"hits": [1-9]' -- cat "$work/cache_dp2/summary.json"
# A run shorter than an epoch: rows for the 32 images it sees, not the 64 of the set.
expect 0 "backbone cache: .* up to 0.000352 GB per rank" -- "$st" "${train[@]}" "${lst[@]}" --data.train_samples 64 \
  --data.val_samples 16 --train.steps 2 --train.cache_backbone true --log-level info --output.dir "$work/cache_short"
# bf16: the cache keeps the bf16 outputs, the run trains.
expect 0 "done: eval top-1" -- "$st" "${train[@]}" "${lst[@]}" "${cache_run[@]}" --train.precision bf16 \
  --train.cache_backbone true --output.dir "$work/cache_bf16"

# --- refusals ---------------------------------------------------------------------------------
expect 2 "train.cache_backbone=true with peft.method=lora" -- "$st" "${train[@]}" --peft.method lora \
  --train.cache_backbone true --output.dir "$work/bad"
expect 2 "train.cache_backbone=true with data.transform=timm_train" -- "$st" "${train[@]}" "${lst[@]}" \
  --data.transform timm_train --train.cache_backbone true --output.dir "$work/bad"
expect 2 "train.cache_backbone=true with parallel.pp=2" -- mpi 2 "$st" "${train[@]}" "${lst[@]}" --parallel.pp 2 \
  --train.cache_backbone true --output.dir "$work/bad"
# 5 outputs (the embedding's tokens, 4 ladder inputs) of 17 x 32 floats and 32 features: 11,008 bytes an image.
expect 2 "the cache needs 0.705 MB per rank \(64 images x 0.011 MB\), more than train.cache_max_gb=0.0001" -- \
  "$st" "${train[@]}" "${lst[@]}" "${cache_run[@]}" --train.cache_backbone true --train.cache_max_gb 0.0001 --output.dir "$work/bad"
expect 2 "train.cache_max_gb=0 must be positive" -- "$st" "${train[@]}" "${lst[@]}" --train.cache_backbone true \
  --train.cache_max_gb 0 --output.dir "$work/bad"
expect 2 "peft.side_blocks=4: block 4 is not in \[0, model.depth=4\)" -- "$st" "${train[@]}" "${lst[@]}" --peft.side_blocks 4 \
  --output.dir "$work/bad"
expect 2 "peft.side_reduction=0 must be in \[1, model.dim=32\]" -- "$st" "${train[@]}" "${lst[@]}" --peft.side_reduction 0 \
  --output.dir "$work/bad"
expect 2 "peft.targets is not used by peft.method=lst" -- "$st" "${train[@]}" "${lst[@]}" --peft.targets qkv --output.dir "$work/bad"
finish
