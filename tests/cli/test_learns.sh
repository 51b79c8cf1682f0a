#!/usr/bin/env bash
# The trainer learns: a tiny ViT (dim 64, depth 4, patch 7) trained fully for 300 steps of
# 64 images drawn from 2,000 Fashion-MNIST training images reaches over 70% top-1 on
# 1,000 held-out test images. usage: test_learns.sh SHARDTUNE WORKDIR
set -u
st=$1 work=$2
rm -rf "$work" && mkdir -p "$work"
"$st" train --config "$(dirname "$0")/../../configs/fmnist_pretrain.ini" --output.dir "$work" \
  --data.classes 0-9 --model.num_classes 10 --data.train_samples 2000 --data.val_samples 0 \
  --data.eval_samples 1000 --train.steps 300 --train.warmup_steps 20 --train.weight_decay 0 || exit 1
top1=$(grep -o '"eval_top1": [0-9.e-]*' "$work/summary.json" | awk '{print $2}')
echo "eval top-1: $top1"
awk -v t="$top1" 'BEGIN { exit !(t > 0.70) }' || { echo "FAIL: top-1 $top1 is not above 0.70"; exit 1; }
