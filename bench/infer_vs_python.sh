#!/usr/bin/env bash
# Inference side by side (issue 17): ShardTune's eval forward (build/shardtune_step_ab mode=infer:
# the model `shardtune eval` / `predict` build, with train.frozen_gemm=auto's kernel choices)
# against Python eager `torch.no_grad()` forward of the same ViT (bench/python_step.py
# --inference), both on Debian's LibTorch 1.13, alternating C++ then Python ROUNDS times per
# (precision, batch). Prints a markdown table of median images/s and the ratio of times.
#
#   cmake --build build --target shardtune_step_ab
#   bench/infer_vs_python.sh [--arch A] [--depth D] [--batches "64 256"] [--precisions "fp32 bf16"]
#                            [--rounds 2] [--steps 4] [--threads 2]
set -euo pipefail
ARCH=vit_base_patch16_224 DEPTH="" BATCHES="64 256" PRECISIONS="fp32 bf16" ROUNDS=2 STEPS=4 THREADS=2
PY=/usr/bin/python3 BIN=build/shardtune_step_ab
while [[ $# -gt 0 ]]; do
  case "$1" in
    --arch) ARCH=$2; shift 2 ;;
    --depth) DEPTH=$2; shift 2 ;;
    --batches) BATCHES=$2; shift 2 ;;
    --precisions) PRECISIONS=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ -x "$BIN" ]] || { echo "no $BIN: cmake --build build --target shardtune_step_ab" >&2; exit 1; }
[[ -z "$DEPTH" ]] || { echo "--depth: shardtune_step_ab builds the preset's depth; use --arch" >&2; exit 2; }
HERE=$(cd "$(dirname "$0")" && pwd)
export OMP_NUM_THREADS=$THREADS
OUT=$(mktemp -d /tmp/infer_vs_python.XXXXXX)
echo "| precision | batch | C++ images/s | Python images/s | C++/Python time |"
echo "|---|---|---|---|---|"
for p in $PRECISIONS; do
  for b in $BATCHES; do
    cpp=() py=()
    for ((r = 1; r <= ROUNDS; r++)); do
      "$BIN" arch="$ARCH" precision="$p" batch="$b" rounds="$STEPS" variants=auto mode=infer > "$OUT/cpp_${p}_${b}_$r.txt"
      cpp+=("$(awk -F'|' '/^\| auto /{gsub(/ /,"",$5); print $5}' "$OUT/cpp_${p}_${b}_$r.txt")")
      "$PY" "$HERE/python_step.py" --inference --arch "$ARCH" --precision "$p" --batch "$b" --train-samples "$b" \
        --steps $((STEPS + 1)) --warmup 1 --threads "$THREADS" > "$OUT/py_${p}_${b}_$r.json"
      py+=("$("$PY" -c 'import json,sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])["images_per_s"])' "$OUT/py_${p}_${b}_$r.json")")
    done
    "$PY" - "$p" "$b" "${cpp[*]}" "${py[*]}" <<'PYEOF'
import statistics, sys
c = statistics.median(float(x) for x in sys.argv[3].split())
y = statistics.median(float(x) for x in sys.argv[4].split())
print(f"| {sys.argv[1]} | {sys.argv[2]} | {c:.1f} | {y:.1f} | {y / c:.2f} |")
PYEOF
  done
done
echo "(per-run outputs in $OUT)"
