#!/usr/bin/env bash
# Pipeline bubble: the measured share of a step each stage spends waiting for a neighbour
# (summary.json pipeline_wait_fraction, the max over ranks) against the ideal
# (p-1)/(m+p-1), for pp=2 (one single-threaded rank per core) over micro-batch counts.
# usage: bench/pipeline_bubble.sh [SHARDTUNE] [OUT_DIR]
set -eu
st=${1:-build/shardtune}
out=${2:-/tmp/pipeline_bubble}
mkdir -p "$out"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
echo "| schedule | pp | micro-batches | ideal bubble | measured wait share | step time (s) |"
echo "|---|---|---|---|---|---|"
for schedule in gpipe 1f1b; do
  for m in 1 2 4 8; do
    dir=$out/${schedule}_m$m
    mpiexec --oversubscribe -n 2 "$st" train --model.arch vit --model.image_size 28 --model.patch_size 4 \
      --model.in_chans 1 --model.dim 192 --model.depth 8 --model.heads 3 --model.mlp_dim 768 --model.num_classes 10 \
      --peft.method lora --data.dataset synthetic --data.train_samples 256 --data.val_samples 0 --data.eval_samples 8 \
      --data.batch_size 64 --train.steps 8 --parallel.pp 2 --parallel.microbatches "$m" --parallel.schedule "$schedule" \
      --output.dir "$dir" --output.resume never --log-level warn >/dev/null
    python3 - "$dir/summary.json" "$schedule" "$m" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"| {sys.argv[2]} | 2 | {sys.argv[3]} | {s['pipeline_bubble_ideal']:.3f} | {s['pipeline_wait_fraction']:.3f} | {s['step_time_s']:.3f} |")
PY
  done
done
