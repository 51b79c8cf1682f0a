#!/usr/bin/env bash
# Sharded runs end to end: `predict` on tp/pp meshes returns the single-process logits,
# `merge` under tp=2 pp=2 writes the single-process merged file, `train` on (dp, tp, pp)
# meshes ends with the single-process adapter (lora, vpt_deep, adapter), a pipelined run
# resumes exactly, and unsupported combinations fail with a message.
# usage: test_sharding.sh SHARDTUNE TESTKIT MPIEXEC WORKDIR
set -u
st=$1 kit=$2 mpiexec=$3 work=$4
rm -rf "$work" && mkdir -p "$work"
source "$(dirname "$0")/lib.sh"

cfg=$work/tiny.ini
tiny_run_ini 4 >"$cfg"
mpi() { local n=$1; shift; "$mpiexec" --oversubscribe -n "$n" "$@"; }

expect 0 "wrote" -- "$st" init --config "$cfg" --out "$work/init.safetensors"
expect 0 "wrote 6 images" -- "$kit" make-input /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz \
  /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz 6 28 1 0.286,0.353 "$work/input.safetensors"
pred=(predict --config "$cfg" --model.checkpoint "$work/init.safetensors" --input "$work/input.safetensors")
expect 0 "wrote logits \[6, 5\]" -- "$st" "${pred[@]}" --out "$work/logits_1.safetensors"
for mesh in "4 2 2" "4 4 1" "4 1 4" "2 2 1" "2 1 2"; do
  read -r n tp pp <<<"$mesh"
  out=$work/logits_${n}_${tp}_${pp}.safetensors
  expect 0 "tp=$tp pp=$pp.*wrote logits \[6, 5\]" -- mpi "$n" "$st" "${pred[@]}" --parallel.tp "$tp" --parallel.pp "$pp" --out "$out"
  expect 0 "<= 1e-05" -- "$kit" compare "$work/logits_1.safetensors" "$out" logits 1e-5
done

# merge: every rank folds LoRA into its shards; rank 0 writes the whole backbone.
expect 0 "" -- "$kit" make-adapter "$cfg" lora "$work/adapter_lora" 7
merge=(merge --config "$cfg" --model.checkpoint "$work/init.safetensors" --adapter "$work/adapter_lora")
expect 0 "merged the lora adapter" -- "$st" "${merge[@]}" --out "$work/merged_1.safetensors"
expect 0 "merged the lora adapter" -- mpi 4 "$st" "${merge[@]}" --parallel.tp 2 --parallel.pp 2 --out "$work/merged_4.safetensors"
expect 0 "<= 1e-06" -- "$kit" compare "$work/merged_1.safetensors" "$work/merged_4.safetensors" "*" 1e-6

# train: (dp, tp, pp) meshes against one process, 6 AdamW steps, 2 micro-batches.
train=(train --config "$cfg" --model.checkpoint "$work/init.safetensors" --model.load_head false)
for method in lora vpt_deep adapter; do
  expect 0 "done: eval top-1" -- "$st" "${train[@]}" --peft.method "$method" --output.dir "$work/t_${method}_1"
  for mesh in "1 1 2" "1 2 1" "1 2 2" "2 1 2" "2 1 1"; do
    read -r dp tp pp <<<"$mesh"
    dir=$work/t_${method}_${dp}_${tp}_${pp}
    expect 0 "done: eval top-1" -- mpi $((dp * tp * pp)) "$st" "${train[@]}" --peft.method "$method" \
      --parallel.tp "$tp" --parallel.pp "$pp" --parallel.microbatches 2 --output.dir "$dir"
    expect 0 "<= 0.001" -- "$kit" compare "$work/t_${method}_1/adapter/adapter_model.safetensors" \
      "$dir/adapter/adapter_model.safetensors" "*" 1e-3
  done
done
grep -q '"pipeline_bubble_ideal": 0.333' "$work/t_lora_1_1_2/summary.json" && pass "summary: ideal bubble (p-1)/(m+p-1)" ||
  failed "summary.json lacks pipeline_bubble_ideal 0.333: $(cat "$work/t_lora_1_1_2/summary.json")"

# A pipelined run stopped after 3 steps and resumed ends where an uninterrupted one does.
piped=("${train[@]}" --parallel.pp 2 --parallel.microbatches 2 --parallel.schedule gpipe)
expect 0 "done: eval top-1" -- mpi 2 "$st" "${piped[@]}" --output.dir "$work/p_full"
expect 0 "stopping at step 3" -- mpi 2 "$st" "${piped[@]}" --output.dir "$work/p_resumed" --train.exit_interval 3
grep -q '"blocks.3.attn.qkv.lora_A_q.weight.exp_avg"' <(head -c 8192 "$work/p_resumed/checkpoints/step_3/optimizer.safetensors") &&
  pass "the checkpoint holds stage 1's optimizer state by name" || failed "no stage-1 optimizer state in optimizer.safetensors"
expect 0 "resumed from .*step_3 at step 3.*done" -- mpi 2 "$st" "${piped[@]}" --output.dir "$work/p_resumed"
cmp -s "$work/p_full/adapter/adapter_model.safetensors" "$work/p_resumed/adapter/adapter_model.safetensors" &&
  pass "resumed pipelined adapter is byte-identical" || failed "resumed pipelined adapter differs"

# What cannot be sharded is a usage error on every rank, before any collective.
expect 2 "fact_tt shares U, V and C across all blocks" -- mpi 2 "$st" "${train[@]}" --peft.method fact_tt \
  --parallel.pp 2 --output.dir "$work/bad"
expect 2 "peft.method=full with parallel.tp=2" -- mpi 2 "$st" "${train[@]}" --peft.method full \
  --parallel.tp 2 --output.dir "$work/bad"
finish
