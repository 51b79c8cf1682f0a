#!/usr/bin/env bash
# The project's own VTAB-1k-style transfer benchmark (docs/BENCHMARKS.md):
#   1. pretrain a small ViT fully on Fashion-MNIST classes 0-4 (configs/fmnist_pretrain.ini),
#      unless runs/fmnist_pretrain/backbone.safetensors exists;
#   2. fine-tune it on classes 5-9 from 1,000 training images (800 train + 200 val) with
#      every PEFT method, linear and full; each method's learning rate is chosen on the
#      validation split from LRS, never on the test images;
#   3. print a markdown table: method, trainable parameters, the chosen lr, val and test
#      top-1 (5,000 test images of classes 5-9), median step time.
# usage: scripts/transfer_benchmark.sh [RANKS]   (default 2, under mpirun)
#        METHODS="lora lst" scripts/transfer_benchmark.sh   (only those rows)
set -euo pipefail
cd "$(dirname "$0")/.."
ranks=${1:-2}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
run=(mpirun --oversubscribe -np "$ranks" build/shardtune)
[[ -x build/shardtune ]] || scripts/setup.sh
if [[ ! -f runs/fmnist_pretrain/backbone.safetensors ]]; then
  "${run[@]}" train --config configs/fmnist_pretrain.ini --output.resume never --log-level warn
fi
methods=(full linear lora adapter adaptformer vpt_shallow vpt_deep prefix bitfit ln_tune ssf fact_tt lst)
[[ -n "${METHODS:-}" ]] && read -r -a methods <<<"$METHODS"  # e.g. METHODS="lora lst"
lrs=(0.001 0.003 0.01)
field() { grep -o "\"$2\": [^,}]*" "$1" | head -1 | awk '{print $2}'; }
echo "| method | trainable params | lr (chosen on val) | val top-1 | test top-1 | step time (ms) |"
echo "|---|---|---|---|---|---|"
for m in "${methods[@]}"; do
  best_val=-1 best_lr="" best_dir=""
  for lr in "${lrs[@]}"; do
    out=runs/transfer/$m/lr_$lr
    "${run[@]}" train --config configs/fmnist_lora.ini --peft.method "$m" --train.lr "$lr" \
      --output.dir "$out" --output.resume never --log-level warn
    val=$(field "$out/summary.json" val_top1)
    if awk -v a="$val" -v b="$best_val" 'BEGIN { exit !(a > b) }'; then best_val=$val best_lr=$lr best_dir=$out; fi
  done
  s=$best_dir/summary.json
  printf "| %s | %s | %s | %.3f | %.4f | %.1f |\n" "$m" "$(field "$s" trainable_params)" "$best_lr" \
    "$best_val" "$(field "$s" eval_top1)" "$(awk -v t="$(field "$s" step_time_s)" 'BEGIN { print t * 1000 }')"
done
