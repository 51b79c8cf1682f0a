#!/usr/bin/env bash
# LoRA adapters between ShardTune and Hugging Face PEFT, end to end, against the testkit's
# PEFT reference (tools/peft_reference.cpp: PEFT's semantics from the files alone):
# - export: a trained LoRA (q,v parts; and qkv + fc1 with rank_pattern and rsLoRA) written as a
#   PEFT adapter gives, merged the PEFT way, the logits of `predict --adapter` (1e-5);
# - import: PEFT adapters (list and regex targets, rsLoRA off and on, rank/alpha patterns, a
#   head in modules_to_save) through predict on 1 process and on tp=2 / pp=2 meshes, eval,
#   merge, and train --peft.init_adapter;
# - format-1 adapters (tests/fixtures/adapter_format1) still give their logits;
# - what ShardTune cannot honour is an error naming the key and value.
# usage: test_peft_format.sh SHARDTUNE TESTKIT MPIEXEC WORKDIR FIXTURES
set -u
st=$1 kit=$2 mpiexec=$3 work=$4 fixtures=$5
rm -rf "$work" && mkdir -p "$work"
source "$(dirname "$0")/lib.sh"
mpi() { local n=$1; shift; "$mpiexec" --oversubscribe -n "$n" "$@"; }

cfg=$work/tiny.ini
tiny_run_ini 4 >"$cfg"
expect 0 "wrote" -- "$st" init --config "$cfg" --out "$work/init.safetensors"
expect 0 "wrote 6 images" -- "$kit" make-input /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz \
  /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz 6 28 1 0.286,0.353 "$work/input.safetensors"
pred=(predict --config "$cfg" --input "$work/input.safetensors")

# `same_logits NAME ADAPTER [NP TP PP]`: predict --adapter on init.safetensors (alone, or under
# mpiexec -n NP on that mesh) equals a plain predict on the PEFT reference's merge of the adapter.
same_logits() {
  local name=$1 adapter=$2 n=${3:-1} tp=${4:-1} pp=${5:-1}
  local run=("$st")
  [[ $n -gt 1 ]] && run=(mpi "$n" "$st")
  expect 0 "merged [0-9]+ LoRA pairs" -- "$kit" peft-merge "$work/init.safetensors" "$adapter" "$work/$name.merged.safetensors"
  expect 0 "wrote logits \[6, 5\]" -- "$st" "${pred[@]}" --model.checkpoint "$work/$name.merged.safetensors" \
    --out "$work/$name.reference.safetensors"
  expect 0 "wrote logits \[6, 5\]" -- "${run[@]}" "${pred[@]}" --model.checkpoint "$work/init.safetensors" --adapter "$adapter" \
    --parallel.tp "$tp" --parallel.pp "$pp" --out "$work/$name.logits.safetensors"
  expect 0 "<= 1e-05" -- "$kit" compare "$work/$name.logits.safetensors" "$work/$name.reference.safetensors" logits 1e-5
}

# --- export -------------------------------------------------------------------------------
train=(train --config "$cfg" --model.checkpoint "$work/init.safetensors" --model.load_head false)
expect 0 "done: eval top-1" -- "$st" "${train[@]}" --output.dir "$work/qv"
a=$work/qv/adapter/adapter_config.json
for field in '"peft_type": "LORA"' '"r": 16' '"lora_alpha": 16.0' '"target_modules": \[' '"attn.qkv"' \
  '"modules_to_save": \[' '"use_rslora": false' '"bias": "none"' '"format_version": 2'; do
  if grep -Eq -- "$field" "$a"; then pass "export config has $field"; else failed "export config lacks $field"; fi
done
for key in '"base_model.model.blocks.0.attn.qkv.lora_A.weight":{"dtype":"F32","shape":[16,32]' \
  '"base_model.model.blocks.3.attn.qkv.lora_B.weight":{"dtype":"F32","shape":[96,16]' \
  '"base_model.model.head.weight":{"dtype":"F32","shape":[5,32]'; do
  if grep -aqF -- "$key" "$work/qv/adapter/adapter_model.safetensors"; then pass "export holds $key"; else failed "export lacks $key"; fi
done
same_logits export_qv "$work/qv/adapter"
for mesh in "2 1 2" "4 2 2"; do  # the stacked pairs split back on every stage and tp rank
  read -r n tp pp <<<"$mesh"
  same_logits "export_qv_${n}_${tp}_${pp}" "$work/qv/adapter" "$n" "$tp" "$pp"
done
expect 0 "done: eval top-1" -- "$st" "${train[@]}" --output.dir "$work/fc1" --peft.targets attn.qkv,mlp.fc1 \
  --peft.rank_pattern fc1:2 --peft.alpha_pattern 3.mlp.fc1:5 --peft.rslora true --peft.qkv_parts q,k,v
grep -q '"3.mlp.fc1": 5.0' "$work/fc1/adapter/adapter_config.json" && pass "per-block alpha_pattern key" ||
  failed "per-block alpha_pattern key"
same_logits export_fc1 "$work/fc1/adapter"

# --- import -------------------------------------------------------------------------------
expect 0 "wrote a PEFT LoRA adapter" -- "$kit" make-peft-lora "$cfg" "$work/peft_list" 1 0 list
expect 0 "wrote a PEFT LoRA adapter" -- "$kit" make-peft-lora "$cfg" "$work/peft_regex" 2 1 regex
same_logits import_list "$work/peft_list"
same_logits import_regex "$work/peft_regex"
for mesh in "2 2 1" "2 1 2" "4 2 2"; do
  read -r n tp pp <<<"$mesh"
  same_logits "import_${n}_${tp}_${pp}" "$work/peft_regex" "$n" "$tp" "$pp"
done
expect 0 "eval top-1 [0-9.]+ on 200 test images \(lora adapter from .*peft_list\)" -- "$st" eval --config "$cfg" \
  --model.checkpoint "$work/init.safetensors" --adapter "$work/peft_list" --output.dir "$work/eval_peft"
expect 0 "eval top-1 .*lora adapter" -- mpi 2 "$st" eval --config "$cfg" --model.checkpoint "$work/init.safetensors" \
  --adapter "$work/qv/adapter" --parallel.pp 2 --output.dir "$work/eval_qv_pp2"
expect 0 "merged the lora adapter" -- "$st" merge --config "$cfg" --model.checkpoint "$work/init.safetensors" \
  --adapter "$work/peft_list" --out "$work/merged_by_shardtune.safetensors"
expect 0 "<= 1e-05" -- "$kit" compare "$work/merged_by_shardtune.safetensors" "$work/import_list.merged.safetensors" "*" 1e-5
# train from it: at lr 1e-20 the adapter written at the end is the one read at the start.
expect 0 "starting from the lora adapter.*done: eval top-1" -- "$st" "${train[@]}" --peft.init_adapter "$work/peft_regex" \
  --train.lr 1e-20 --train.steps 2 --output.dir "$work/init_from_peft"
same_logits init_from_peft "$work/init_from_peft/adapter"
expect 0 "<= 1e-05" -- "$kit" compare "$work/init_from_peft.logits.safetensors" "$work/import_regex.reference.safetensors" logits 1e-5
expect 2 "peft.method=adapter but peft.init_adapter=.* is a lora adapter" -- "$st" "${train[@]}" \
  --peft.init_adapter "$work/peft_regex" --peft.method adapter --output.dir "$work/init_conflict"

# --- format 1 --------------------------------------------------------------------------------
f1=$fixtures/adapter_format1
fcfg=$(dirname "$0")/../../configs/fmnist_vit_tiny.ini
expect 0 "wrote" -- "$st" init --config "$fcfg" --out "$work/f1_init.safetensors"
for method in lora bitfit; do
  expect 0 "with the $method adapter" -- "$st" predict --config "$fcfg" --model.checkpoint "$work/f1_init.safetensors" \
    --input "$f1/input.safetensors" --adapter "$f1/$method" --out "$work/f1_$method.safetensors"
  expect 0 "<= 1e-06" -- "$kit" compare "$work/f1_$method.safetensors" "$f1/$method/logits_expected.safetensors" logits 1e-6
done

# --- refused -------------------------------------------------------------------------------
refuse() {  # refuse NAME SED_EXPR CODE REGEX: the PEFT adapter with its config edited is an error
  local d=$work/refuse_$1
  cp -r "$work/peft_list" "$d"
  sed -i -E "$2" "$d/adapter_config.json"
  expect "$3" "$4" -- "$st" "${pred[@]}" --model.checkpoint "$work/init.safetensors" --adapter "$d" --out "$d/x.safetensors"
}
refuse dora 's/"use_dora": false/"use_dora": true/' 2 'adapter_config.json: use_dora=true: DoRA is not supported'
refuse bias 's/"bias": "none"/"bias": "all"/' 2 'adapter_config.json: bias="all": only "none" is supported'
refuse fan 's/"fan_in_fan_out": false/"fan_in_fan_out": true/' 2 'fan_in_fan_out=true: a timm ViT.s layers are nn.Linear'
refuse norm 's/"qkv",/"norm1",/' 2 'adapter_config.json: peft.targets=norm1,mlp.fc1 names blocks.0.norm1, which is not a Linear layer'
refuse ia3 's/"peft_type": "LORA"/"peft_type": "IA3"/' 2 'peft_type="IA3": only Hugging Face PEFT LoRA adapters'
refuse json 's/^\{/{,/' 1 'adapter_config.json: malformed JSON: parse error at line 1'
finish
