#!/usr/bin/env bash
# README command 1: the main job, a real fine-tuning run on the bundled Fashion-MNIST.
#   1. set up and build (apt packages only when missing; incremental build);
#   2. if runs/fmnist_pretrain/backbone.safetensors is missing, pretrain a small ViT
#      (dim 64, depth 4, patch 7) fully on classes 0-4 and save it as a timm-named backbone;
#   3. fine-tune it with LoRA (r=8 on q and v, new head) on classes 5-9 from 1,000 images,
#      under mpirun with 2 data-parallel ranks, and print the top-1 on the 5,000 test images.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mpirun=(mpirun --oversubscribe -np 2)
if [[ ! -f runs/fmnist_pretrain/backbone.safetensors ]]; then
  "${mpirun[@]}" build/shardtune train --config configs/fmnist_pretrain.ini --output.resume never
fi
"${mpirun[@]}" build/shardtune train --config configs/fmnist_lora.ini --output.resume never
echo "main job: LoRA fine-tuning on Fashion-MNIST classes 5-9 from 1,000 images:"
cat runs/fmnist_lora/summary.json
