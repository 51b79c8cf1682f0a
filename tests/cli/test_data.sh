#!/usr/bin/env bash
# Image files end to end: a PNG image folder (and list files) of Fashion-MNIST images trains
# bit-for-bit the IDX run's adapter; classes.json; dp=2 and pp=2 under mpiexec; `predict` on
# image files with class names; `shardtune data` (counts, --check, --benchmark); bad images
# (error naming the file, or data.bad_images=skip counted in summary.json); index errors.
# usage: test_data.sh SHARDTUNE TESTKIT MPIEXEC WORKDIR
set -u
st=$1 kit=$2 mpiexec=$3 work=$4
rm -rf "$work" && mkdir -p "$work"
source "$(dirname "$0")/lib.sh"
fm=/usr/share/datasets/fashion-mnist
[[ -d $fm ]] || { echo "no Fashion-MNIST at $fm"; exit 77; }

"$kit" image-folder "$fm" "$work/fm" 400 100 >/dev/null || { failed "testkit image-folder"; finish; exit 1; }
cfg=$work/tiny.ini
{ tiny_model_ini 2; cat <<INI
[peft]
method = lora
[data]
classes = 0-4
val_samples = 40
batch_size = 16
[train]
steps = 6
lr = 0.01
warmup_steps = 2
seed = 4
INI
} >"$cfg"
expect 0 "wrote" -- "$st" init --config "$cfg" --out "$work/backbone.safetensors"
ck=(--model.checkpoint "$work/backbone.safetensors")
png=(--data.dataset imagefolder --data.root "$work/fm/png")

expect 0 "done: eval top-1" -- "$st" train --config "$cfg" "${ck[@]}" --data.root "$work/fm/idx" --output.dir "$work/idx"
expect 0 "imagefolder $work/fm/png: 5 classes, [0-9]+ train / 40 val / [0-9]+ test images.*done: eval top-1" -- \
  "$st" train --config "$cfg" "${ck[@]}" "${png[@]}" --data.workers 3 --output.dir "$work/png"
cmp -s "$work/idx/adapter/adapter_model.safetensors" "$work/png/adapter/adapter_model.safetensors" \
  && pass "PNG folder trains bit-for-bit the IDX run's adapter" || failed "PNG folder adapter differs from the IDX one"
for f in classes.json adapter/classes.json; do
  grep -q '"4_coat"' "$work/png/$f" 2>/dev/null && pass "$f names the classes" || failed "$f lacks the class names"
done
grep -q '"T-shirt/top"' "$work/idx/classes.json" && pass "IDX run's classes.json" || failed "IDX run's classes.json"
grep -q '"data_wait_fraction"' "$work/png/summary.json" && pass "summary has data_wait_fraction" || failed "no data_wait_fraction"
grep -q '"skipped_images": 0' "$work/png/summary.json" && pass "no skipped images" || failed "skipped_images not 0"
# eval on the image folder's test split reads the adapter's classes.json.
expect 0 "classes: 0_tshirt_top \.\.\. 4_coat.*eval top-1 [0-9.]+ on [0-9]+ test images" -- \
  "$st" eval --config "$cfg" "${ck[@]}" "${png[@]}" --adapter "$work/png/adapter" --output.dir "$work/eval"
# The list files of the same images (all 10 classes) against the IDX run of all 10 classes.
expect 0 "done" -- "$st" train --config "$cfg" "${ck[@]}" --model.num_classes 10 --data.classes "" --model.load_head false \
  --data.root "$work/fm/idx" --output.dir "$work/idx10" --train.steps 3
expect 0 "filelist .*10 classes.*done" -- "$st" train --config "$cfg" "${ck[@]}" --model.num_classes 10 --data.classes "" \
  --model.load_head false --data.dataset filelist --data.root "$work/fm/png" --data.train_list train.txt --data.test_list test.txt \
  --output.dir "$work/list10" --train.steps 3
cmp -s "$work/idx10/adapter/adapter_model.safetensors" "$work/list10/adapter/adapter_model.safetensors" \
  && pass "list files train bit-for-bit the IDX run's adapter" || failed "list-file adapter differs from the IDX one"

# dp=2 (each rank decodes its slice) and pp=2 (only the first stage decodes).
mpi=("$mpiexec" --oversubscribe -n 2)
expect 0 "done: eval top-1" -- "${mpi[@]}" "$st" train --config "$cfg" "${ck[@]}" "${png[@]}" --output.dir "$work/dp2"
expect 0 "<= 0.001" -- "$kit" compare "$work/dp2/adapter/adapter_model.safetensors" "$work/png/adapter/adapter_model.safetensors" "*" 1e-3
expect 0 "done: eval top-1" -- "${mpi[@]}" "$st" train --config "$cfg" "${ck[@]}" "${png[@]}" --parallel.pp 2 --output.dir "$work/pp2"
expect 0 "<= 0.001" -- "$kit" compare "$work/pp2/adapter/adapter_model.safetensors" "$work/png/adapter/adapter_model.safetensors" "*" 1e-3

# predict on image files: top-5 with names, a table or JSON lines.
a=$(ls "$work/fm/png/test/3_dress" | head -1) b=$(ls "$work/fm/png/test/1_trouser" | head -1)
imgs=("$work/fm/png/test/3_dress/$a" "$work/fm/png/test/1_trouser/$b")
expect 0 "3_dress/$a  +1\. +[0-9.]+%  [0-4]_[a-z_]+ \([0-4]\) +2\. .* 5\. " -- \
  "$st" predict --config "$cfg" "${ck[@]}" --adapter "$work/png/adapter" --images "${imgs[@]}"
out=$("$st" predict --config "$cfg" "${ck[@]}" --adapter "$work/png/adapter" --images "${imgs[@]}" --format jsonl --log-level warn)
[[ $(grep -c '^{"image":.*"top":\[{"class":[0-4],"name":"[0-4]_[a-z_]*","prob":' <<<"$out") -eq 2 ]] \
  && pass "predict --format jsonl: a line an image" || failed "predict jsonl: $out"
n=$(ls "$work/fm/png/test/2_pullover" | wc -l)
[[ $("$st" predict --config "$cfg" "${ck[@]}" --adapter "$work/png/adapter" --image-dir "$work/fm/png/test/2_pullover" \
      --format jsonl --log-level warn | wc -l) -eq $n ]] && pass "predict --image-dir: $n lines" || failed "predict --image-dir"
expect 2 "--images: $work/none.png does not exist" -- "$st" predict --config "$cfg" "${ck[@]}" --images "$work/none.png"

# shardtune data: counts per split, --check, --benchmark.
expect 0 "5 classes.*class +train +val +test.*0_tshirt_top +[0-9]+ +[0-9]+ +[0-9]+" -- "$st" data --config "$cfg" "${png[@]}"
expect 0 "checked [0-9]+ files: 0 do not decode" -- "$st" data --config "$cfg" "${png[@]}" --check
expect 0 '\{"batch_size":16,"batches":3,"images_per_sec":[0-9.e+]+,"transform":"timm_train","workers":2\}' -- \
  "$st" data --config "$cfg" "${png[@]}" --benchmark 3 --data.workers 2 --data.transform timm_train

# Bad images: an error naming the file, or skipped and counted.
cp -r "$work/fm/png" "$work/bad"
victim=$(ls -d "$work"/bad/train/2_pullover/* | head -1)
head -c 40 "$victim" >"$victim.tmp" && mv "$victim.tmp" "$victim"
bad=(--data.dataset imagefolder --data.root "$work/bad")
expect 1 "bad train image: $victim: corrupt PNG.*1 do not decode" -- "$st" data --config "$cfg" "${bad[@]}" --check
expect 1 "$victim: corrupt PNG" -- "$st" train --config "$cfg" "${ck[@]}" "${bad[@]}" --data.val_samples 0 --output.dir "$work/bad_err" --train.steps 40
expect 0 "skipping $victim.*done" -- "$st" train --config "$cfg" "${ck[@]}" "${bad[@]}" --data.val_samples 0 --data.bad_images skip \
  --output.dir "$work/bad_skip" --train.steps 40
grep -q '"skipped_images": 1' "$work/bad_skip/summary.json" && pass "skipped_images 1" || failed "skipped_images not 1"

# Index errors: before any collective, one line naming the folder/key.
expect 1 "data.root=$work/nowhere: not a folder" -- "${mpi[@]}" "$st" train --config "$cfg" --data.dataset imagefolder --data.root "$work/nowhere"
expect 2 "model.num_classes=3 but data.root=$work/fm/png has 5 classes in data.classes=0-4" -- \
  "$st" train --config "$cfg" "${png[@]}" --model.num_classes 3
expect 2 "data.transform=big is not one of vtab, timm_eval, timm_train" -- "$st" data --config "$cfg" "${png[@]}" --data.transform big
expect 2 "data.mean=0.5,x: 'x' is not a number" -- "$st" data --config "$cfg" "${png[@]}" --data.mean 0.5,x
finish
