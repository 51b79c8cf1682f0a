#!/usr/bin/env bash
# README command 1: the main job. Sets up and builds, then, until the trainer lands, runs
# the backbone end to end on the bundled data: `shardtune init` makes a seeded ViT for
# Fashion-MNIST (28 px, patch 7, dim 64, depth 4), and `shardtune predict` classifies
# 1,000 test images with it. The backbone is untrained, so top-1 is chance (~10%).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
run=build/main_job
mkdir -p "$run"
cfg=configs/fmnist_vit_tiny.ini
[[ -f $run/backbone.safetensors ]] || build/shardtune init --config "$cfg" --out "$run/backbone.safetensors"
data=/usr/share/datasets/fashion-mnist
build/shardtune_testkit make-input "$data/t10k-images-idx3-ubyte.gz" "$data/t10k-labels-idx1-ubyte.gz" 1000 28 1 \
  0.2860,0.3530 "$run/input.safetensors"
build/shardtune predict --config "$cfg" --model.checkpoint "$run/backbone.safetensors" \
  --input "$run/input.safetensors" --out "$run/logits.safetensors"
