#!/usr/bin/env bash
# Side tuning against LoRA, and the backbone-output cache (issue 21; docs/BENCHMARKS.md).
#   step    ViT-B/16 at 224 px, batch 8, one process: the median step of `lst` and of `lora`
#           (r=8 on q and v), run alternately lora, lst, lora, lst, ... (ROUNDS rounds) at fp32
#           and bf16; synthetic data, the first step left out (shardtune's own median)
#   rss     the same model at batch 32: peak RSS of one lora and one lst run per precision
#   cache   the transfer benchmark's fine-tuning run (configs/fmnist_lora.ini: 500 steps of 32
#           on 800 images; needs runs/fmnist_pretrain from scripts/transfer_benchmark.sh) with
#           linear and lst, train.cache_backbone off and on: whole-process wall time, median
#           step of the first epoch (steps 2-25) and of the later ones, final top-1, and whether
#           the two adapters are bit-identical
#   vitg    ViT-g/14 (1.0 B parameters, random init) on 4 ranks, tp=2 x pp=2, bf16, batch 4 in
#           2 micro-batches: lst against lora, step time and peak RSS per rank
# Prints the host's 4096^2 matmul rates first (shardtune_testkit matmul-peak).
# usage: bench/lst_vs_lora.sh [step] [rss] [cache] [vitg]   (default: step rss cache)
#        ROUNDS=2 STEPS=5 environment overrides
set -euo pipefail
cd "$(dirname "$0")/.."
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
parts=("$@")
[[ ${#parts[@]} -eq 0 ]] && parts=(step rss cache)
ROUNDS=${ROUNDS:-2} STEPS=${STEPS:-5}
out=runs/bench_lst
mkdir -p "$out"
field() { grep -o "\"$2\": [^,}]*" "$1" | head -1 | awk '{print $2}'; }
median() { sort -g | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
echo "host matmul peak (GFLOP/s, 4096^2, best of 8): $(build/shardtune_testkit matmul-peak)"
vitb=(train --model.arch vit_base_patch16_224 --model.num_classes 10 --data.dataset synthetic
      --data.train_samples 64 --data.val_samples 8 --data.eval_samples 8 --output.resume never --log-level warn)
has() { local p; for p in "${parts[@]}"; do [[ $p == "$1" ]] && return 0; done; return 1; }

if has step; then
  echo
  echo "| precision | lora step | lst step | lst/lora | lora trainable | lst trainable |"
  echo "|---|---|---|---|---|---|"
  for precision in fp32 bf16; do
    declare -A times=()
    for ((round = 0; round < ROUNDS; round++)); do
      for method in lora lst; do
        d=$out/step_${precision}_${method}_$round
        build/shardtune "${vitb[@]}" --peft.method "$method" --train.precision "$precision" --data.batch_size 8 \
          --train.steps "$STEPS" --output.dir "$d"
        times[$method]+="$(field "$d/summary.json" step_time_s) "
      done
    done
    l=$(tr ' ' '\n' <<<"${times[lora]}" | grep . | median)
    s=$(tr ' ' '\n' <<<"${times[lst]}" | grep . | median)
    printf "| %s | %.3f s | %.3f s | **%.2f** | %s | %s |\n" "$precision" "$l" "$s" "$(awk -v a="$s" -v b="$l" 'BEGIN{print a/b}')" \
      "$(field "$out/step_${precision}_lora_0/summary.json" trainable_params)" \
      "$(field "$out/step_${precision}_lst_0/summary.json" trainable_params)"
    echo "  (runs, lora: ${times[lora]}; lst: ${times[lst]})"
    unset times
  done
fi

if has rss; then
  echo
  echo "| precision | lora peak RSS | lst peak RSS | lst/lora | lora step | lst step |"
  echo "|---|---|---|---|---|---|"
  for precision in fp32 bf16; do
    for method in lora lst; do
      build/shardtune "${vitb[@]}" --peft.method "$method" --train.precision "$precision" --data.batch_size 32 \
        --train.steps 3 --output.dir "$out/rss_${precision}_$method"
    done
    a=$out/rss_${precision}_lora/summary.json b=$out/rss_${precision}_lst/summary.json
    printf "| %s | %.0f MB | %.0f MB | **%.2f** | %.2f s | %.2f s |\n" "$precision" "$(field "$a" peak_rss_mb)" \
      "$(field "$b" peak_rss_mb)" "$(awk -v a="$(field "$b" peak_rss_mb)" -v b="$(field "$a" peak_rss_mb)" 'BEGIN{print a/b}')" \
      "$(field "$a" step_time_s)" "$(field "$b" step_time_s)"
  done
fi

if has cache; then
  [[ -f runs/fmnist_pretrain/backbone.safetensors ]] || { echo "cache: run scripts/transfer_benchmark.sh first" >&2; exit 1; }
  echo
  echo "| method | lr | cache | process wall time | training loop | step, epoch 1 | step, later epochs | test top-1 | adapter |"
  echo "|---|---|---|---|---|---|---|---|---|"
  for spec in linear:0.01 lst:0.01; do  # the transfer benchmark's lr choices
    method=${spec%%:*} lr=${spec#*:}
    for cache in false true; do
      d=$out/cache_${method}_$cache
      t0=$(date +%s.%N)
      build/shardtune train --config configs/fmnist_lora.ini --peft.method "$method" --train.lr "$lr" \
        --train.cache_backbone "$cache" --output.dir "$d" --output.resume never --log-level warn
      wall=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{print b - a}')
      # metrics.jsonl: images_per_sec of each step (batch 32); epoch 1 = steps 1-25 (800 / 32)
      e1=$(grep '"loss"' "$d/metrics.jsonl" | sed -n 2,25p | grep -o '"images_per_sec": *[^,}]*' | awk -F: '{print 32000 / $2}' | median)
      later=$(grep '"loss"' "$d/metrics.jsonl" | sed -n '26,$p' | grep -o '"images_per_sec": *[^,}]*' | awk -F: '{print 32000 / $2}' | median)
      same="-"
      [[ $cache == true ]] && { cmp -s "$out/cache_${method}_false/adapter/adapter_model.safetensors" \
        "$d/adapter/adapter_model.safetensors" && same="bit-identical" || same="differs"; }
      printf "| %s | %s | %s | %.2f s | %.3f s | %.2f ms | %.2f ms | %.4f | %s |\n" "$method" "$lr" "$cache" "$wall" \
        "$(field "$d/summary.json" train_loop_s)" "$e1" "$later" \
        "$(field "$d/summary.json" eval_top1)" "$same"
    done
  done
fi

if has vitg; then
  echo
  echo "| ViT-g/14, 4 ranks tp=2 pp=2 bf16, batch 4 (2 micro-batches) | step | peak RSS (max rank) | pipeline bytes/step (fwd, bwd) |"
  echo "|---|---|---|---|"
  for method in lora lst; do
    d=$out/vitg_$method
    mpirun --oversubscribe -np 4 build/shardtune train --model.arch vit_giant_patch14_224 --model.num_classes 10 \
      --peft.method "$method" --data.dataset synthetic --data.train_samples 16 --data.val_samples 4 --data.eval_samples 4 \
      --data.batch_size 4 --train.steps 3 --train.precision bf16 --parallel.tp 2 --parallel.pp 2 \
      --parallel.microbatches 2 --output.dir "$d" --output.resume never --log-level warn
    printf "| %s | %.1f s | %.0f MB | %s, %s |\n" "$method" "$(field "$d/summary.json" step_time_s)" \
      "$(field "$d/summary.json" peak_rss_mb)" "$(field "$d/summary.json" forward)" "$(field "$d/summary.json" backward)"
  done
fi
