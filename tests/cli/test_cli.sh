#!/usr/bin/env bash
# End-to-end checks of the shardtune binary: init -> predict, exit codes (2 usage, 1
# runtime) and one-line messages that name the offending key, value or file.
# usage: test_cli.sh SHARDTUNE TESTKIT WORKDIR
set -u
st=$1 kit=$2 work=$3
rm -rf "$work" && mkdir -p "$work"
source "$(dirname "$0")/lib.sh"

cfg=$work/tiny.ini
{ tiny_model_ini 2; printf "[train]\nseed = 3\n"; } >"$cfg"

# Happy path: init twice with one seed gives identical files; predict writes logits.
expect 0 "wrote .*init.safetensors" -- "$st" init --config "$cfg" --out "$work/init.safetensors"
expect 0 "wrote" -- "$st" init --config "$cfg" --out "$work/init2.safetensors"
cmp -s "$work/init.safetensors" "$work/init2.safetensors" || { failed "init is not deterministic"; }
expect 0 "wrote 6 images" -- "$kit" make-input /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz \
  /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz 6 28 1 0.286,0.353 "$work/input.safetensors"
expect 0 "wrote logits \[6, 5\].*top-1 against the input's labels" -- \
  "$st" predict --config "$cfg" --model.checkpoint "$work/init.safetensors" --input "$work/input.safetensors" \
  --out "$work/logits.safetensors" --batch-size 4
[[ -s "$work/logits.safetensors" ]] || failed "no logits file"
expect 0 "\[rank 0\] \[info\]" -- "$st" init --config "$cfg" --out "$work/x.safetensors"
expect 0 "usage: shardtune predict" -- "$st" predict --help
expect 0 "model.global_pool" -- "$st" init --help

# Usage errors: exit 2, naming the key or value.
expect 2 "unknown command 'trian'" -- "$st" trian
expect 2 "usage: shardtune" -- "$st"
expect 2 "model.colour" -- "$st" init --config "$cfg" --model.colour red --out "$work/y.safetensors"
expect 2 "model.dim" -- "$st" init --config "$cfg" --model.dim wide --out "$work/y.safetensors"
expect 2 "model.heads=5 does not divide model.dim=32" -- "$st" init --config "$cfg" --model.heads 5 --out "$work/y.safetensors"
expect 2 "--out is required" -- "$st" init --config "$cfg"
expect 2 "model.checkpoint is not set" -- "$st" predict --config "$cfg" --input "$work/input.safetensors" --out "$work/y.safetensors"
expect 2 "--config /nonexistent.ini: cannot open" -- "$st" init --config /nonexistent.ini --out "$work/y.safetensors"
expect 2 "log-level=loud" -- "$st" init --config "$cfg" --out "$work/y.safetensors" --log-level loud

# Runtime errors: exit 1, naming the file and the problem; outputs already there survive.
cp "$work/logits.safetensors" "$work/logits.bak"
printf 'xyz' >"$work/short.safetensors"
expect 1 "short.safetensors: file is 3 bytes" -- \
  "$st" predict --config "$cfg" --model.checkpoint "$work/short.safetensors" --input "$work/input.safetensors" --out "$work/logits.safetensors"
expect 1 "does not fit the model: .*shape mismatch for pos_embed: expected \[1, 17, 64\], found \[1, 17, 32\]" -- \
  "$st" predict --config "$cfg" --model.dim 64 --model.checkpoint "$work/init.safetensors" --input "$work/input.safetensors" --out "$work/logits.safetensors"
"$st" init --config "$cfg" --model.in_chans 3 --out "$work/x3.safetensors" >/dev/null 2>&1
expect 1 "input.safetensors: tensor 'input' has shape \[6, 1, 28, 28\], the model needs \[B, 3, 28, 28\]" -- \
  "$st" predict --config "$cfg" --model.in_chans 3 --model.checkpoint "$work/x3.safetensors" --input "$work/input.safetensors" --out "$work/logits.safetensors"
expect 1 "missing.safetensors: cannot open" -- \
  "$st" predict --config "$cfg" --model.checkpoint "$work/missing.safetensors" --input "$work/input.safetensors" --out "$work/logits.safetensors"
cmp -s "$work/logits.safetensors" "$work/logits.bak" || failed "a failed run changed an existing output"

# Adapters: predict --adapter, and merge -> a plain backbone that predicts the same logits.
for method in lora ssf fact_tt; do
  expect 0 "wrote a $method adapter" -- "$kit" make-adapter "$cfg" $method "$work/adapter_$method" 7
  expect 0 "with the $method adapter from .* wrote logits \[6, 5\]" -- "$st" predict --config "$cfg" --model.checkpoint "$work/init.safetensors" \
    --input "$work/input.safetensors" --out "$work/logits_$method.safetensors" --adapter "$work/adapter_$method"
  expect 0 "merged the $method adapter" -- "$st" merge --config "$cfg" --model.checkpoint "$work/init.safetensors" \
    --adapter "$work/adapter_$method" --out "$work/merged_$method.safetensors"
  expect 0 "wrote logits" -- "$st" predict --config "$cfg" --model.checkpoint "$work/merged_$method.safetensors" \
    --input "$work/input.safetensors" --out "$work/logits_merged_$method.safetensors"
  expect 0 "<= 1e-05" -- "$kit" compare "$work/logits_merged_$method.safetensors" "$work/logits_$method.safetensors" logits 1e-5
  # The adapter really changes the output (so the comparison above is not vacuous).
  expect 1 "> 1e-05" -- "$kit" compare "$work/logits_$method.safetensors" "$work/logits.safetensors" logits 1e-5
done
expect 0 "wrote a adapter adapter" -- "$kit" make-adapter "$cfg" adapter "$work/adapter_adapter" 7
expect 2 "peft.method=adapter cannot be merged" -- "$st" merge --config "$cfg" --model.checkpoint "$work/init.safetensors" \
  --adapter "$work/adapter_adapter" --out "$work/never.safetensors"
[[ ! -e "$work/never.safetensors" ]] || failed "a failed merge wrote its output"
expect 1 "adapter_config.json: the adapter was made for another backbone: model.dim: adapter 32, model 64" -- \
  "$st" predict --config "$cfg" --model.dim 64 --model.checkpoint "$work/init.safetensors" --input "$work/input.safetensors" \
  --out "$work/y.safetensors" --adapter "$work/adapter_lora"
expect 1 "nowhere/adapter_config.json: .*cannot open" -- "$st" predict --config "$cfg" --model.checkpoint "$work/init.safetensors" \
  --input "$work/input.safetensors" --out "$work/y.safetensors" --adapter "$work/nowhere"

finish
