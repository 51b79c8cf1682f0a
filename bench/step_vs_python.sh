#!/usr/bin/env bash
# Side-by-side training-step benchmark (issue 8): ShardTune's C++ LoRA step against the same
# step in Python PyTorch eager (bench/python_step.py), both on Debian's LibTorch 1.13.
#
# For each precision the two run alternately, C++ then Python, ROUNDS times (A B A B ...), with
# the same thread count and the same environment; then a markdown table: the median over the
# rounds of each run's median step time (first step of every run left out, as summary.json
# does), the ratio C++/Python (< 1: C++ is faster) and the largest peak RSS (10^6 bytes).
#
#   bench/step_vs_python.sh [options]
#     --bin PATH          C++ binary (default build/shardtune)
#     --cpp-ranks N       run the C++ step as N data-parallel ranks of THREADS/N threads (mpiexec)
#     --frozen-gemm G     C++ --train.frozen_gemm: auto (default, as shardtune: measured per shape)
#                         | onednn | blas (LibTorch's BLAS, the kernels the Python twin's nn.Linear calls)
#     --python PATH       interpreter with Debian's python3-torch (default /usr/bin/python3)
#     --steps N           steps per run, first one excluded from the median (default 6)
#     --rounds R          A B rounds per precision (default 2)
#     --precisions "P.."  default "fp32 bf16"
#     --arch A            default vit_base_patch16_224 (any preset of both sides)
#     --depth D           override the preset's depth on both sides (e.g. 2 for a smoke test)
#     --batch B           default 8
#     --threads T         default 2 (OMP_NUM_THREADS for both; python_step.py --threads)
#     --bf16-style S      python bf16: autocast (default) | cast (weights stored bf16, like C++)
#     --small-eval        C++: --data.val_samples 8 --data.eval_samples 8, so the final eval
#                         (by default 128 val + 256 test images in chunks of 256, no grad) and
#                         the held data do not dominate the C++ peak RSS
#     --out DIR           where logs, run folders and results.jsonl go (default: a mktemp dir)
#
# Example, a quick smoke test:
#   bench/step_vs_python.sh --arch vit_tiny_patch16_224 --depth 2 --steps 3 --rounds 1
set -euo pipefail

BIN=build/shardtune
CPP_RANKS=1
FROZEN_GEMM=auto
PY=/usr/bin/python3
STEPS=6
ROUNDS=2
PRECISIONS="fp32 bf16"
ARCH=vit_base_patch16_224
DEPTH=""
BATCH=8
THREADS=2
BF16_STYLE=autocast
SMALL_EVAL=0
OUT=""

usage() { sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --bin) BIN=$2; shift 2 ;;
    --cpp-ranks) CPP_RANKS=$2; shift 2 ;;
    --frozen-gemm) FROZEN_GEMM=$2; shift 2 ;;
    --python) PY=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --precisions) PRECISIONS=$2; shift 2 ;;
    --arch) ARCH=$2; shift 2 ;;
    --depth) DEPTH=$2; shift 2 ;;
    --batch) BATCH=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --bf16-style) BF16_STYLE=$2; shift 2 ;;
    --small-eval) SMALL_EVAL=1; shift ;;
    --out) OUT=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done

HERE=$(cd "$(dirname "$0")" && pwd)
[[ -x "$BIN" ]] || { echo "no executable C++ binary at $BIN (--bin PATH)" >&2; exit 1; }
"$PY" -c 'import torch' 2>/dev/null || { echo "$PY cannot import torch (apt-get install python3-torch)" >&2; exit 1; }
(( STEPS >= 2 )) || { echo "--steps must be at least 2 (the first step is not timed)" >&2; exit 2; }
[[ -n "$OUT" ]] || OUT=$(mktemp -d /tmp/step_vs_python.XXXXXX)
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"

# The same environment for both: thread count fixed, nothing else changed. The glibc malloc
# tuning (M_MMAP_THRESHOLD 32 MiB, M_TRIM_THRESHOLD 1 GiB) is applied inside each process:
# by common/runtime.cpp in C++ and by mallopt at the top of python_step.py.
export OMP_NUM_THREADS=$THREADS
unset MALLOC_MMAP_THRESHOLD_ MALLOC_TRIM_THRESHOLD_ MALLOC_MMAP_MAX_ MKL_NUM_THREADS OPENBLAS_NUM_THREADS || true

cpp_args=(--model.arch "$ARCH" --model.num_classes 10 --peft.method lora --data.dataset synthetic
          --data.train_samples 64 --data.batch_size "$BATCH" --train.steps "$STEPS" --output.resume never
          --train.frozen_gemm "$FROZEN_GEMM")
py_args=(--num-classes 10 --train-samples 64 --batch "$BATCH" --steps "$STEPS" --warmup 1 --threads "$THREADS"
         --bf16-style "$BF16_STYLE")
# python_step.py knows the presets of models/vit_config.cpp up to vit_large_patch16_224
py_args+=(--arch "$ARCH")
if [[ -n "$DEPTH" ]]; then cpp_args+=(--model.depth "$DEPTH"); py_args+=(--depth "$DEPTH"); fi
if (( SMALL_EVAL )); then cpp_args+=(--data.val_samples 8 --data.eval_samples 8); fi

echo "# $ARCH${DEPTH:+ depth $DEPTH}, batch $BATCH, $STEPS steps/run, $ROUNDS rounds, $THREADS threads," \
  "C++ $CPP_RANKS rank(s), frozen GEMMs $FROZEN_GEMM; outputs in $OUT" >&2

run_cpp() {  # precision round
  local dir="$OUT/cpp_$1_r$2"
  rm -rf "$dir"
  local launch=()  # C++ over ranks x threads: CPP_RANKS data-parallel ranks sharing THREADS threads
  if (( CPP_RANKS > 1 )); then
    launch=(env OMP_NUM_THREADS=$((THREADS / CPP_RANKS > 0 ? THREADS / CPP_RANKS : 1)) mpiexec --oversubscribe -n "$CPP_RANKS")
    (( EUID == 0 )) && launch+=(--allow-run-as-root)
  fi
  if ! "${launch[@]}" "$BIN" train "${cpp_args[@]}" --train.precision "$1" --output.dir "$dir" > "$dir.log" 2>&1; then
    echo "C++ run failed ($1, round $2); see $dir.log:" >&2; tail -5 "$dir.log" >&2; exit 1
  fi
  "$PY" - "$dir/summary.json" "$1" "$2" >> "$RESULTS" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
print(json.dumps({"impl": "cpp", "precision": sys.argv[2], "round": int(sys.argv[3]),
                  "step_time_s": s["step_time_s"], "peak_rss_mb": s["peak_rss_mb"], "steps": s["steps"]}))
EOF
}

run_py() {  # precision round
  local log="$OUT/py_$1_r$2.log"
  if ! "$PY" "$HERE/python_step.py" "${py_args[@]}" --precision "$1" > "$log" 2>&1; then
    echo "Python run failed ($1, round $2); see $log:" >&2; tail -5 "$log" >&2; exit 1
  fi
  "$PY" - "$log" "$2" >> "$RESULTS" <<'EOF'
import json, sys
line = [l for l in open(sys.argv[1]) if l.startswith("{")][-1]
d = json.loads(line)
d["impl"] = "python"
d["round"] = int(sys.argv[2])
print(json.dumps(d))
EOF
}

# MFU: model FLOPs per step from `shardtune plan` (2 x forward for a frozen backbone,
# REFERENCE.md) against the best of 8 4096 x 4096 matmuls through the same LibTorch (libtorch_cpu.so.1.13,
# which python3-torch loads too), same threads, measured now, in this run: for fp32 the faster of
# BLAS (torch.mm) and oneDNN's inner-product kernel; for bf16 the faster of torch.mm on bf16
# (oneDNN's bf16 GEMM where the CPU has AVX-512 BF16, LibTorch's reference loop elsewhere) and
# the same product widened to fp32 (exact too: what frozen_gemm=auto may pick, ops/cpu_ops.cpp).
FLOPS=$("$BIN" plan --model.arch "$ARCH" ${DEPTH:+--model.depth "$DEPTH"} --model.num_classes 10 --peft.method lora \
  --world-size 1 --parallel.tp 1 --parallel.pp 1 --data.batch_size "$BATCH" 2>/dev/null |
  sed -n 's/.*model FLOPs \/ step *\([0-9.]*\) TFLOP.*/\1/p')
"$PY" - "$THREADS" > "$OUT/matmul.json" <<'EOF'
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
n = 4096
def best_of_8(f):  # the peak: the best of 8 (a busy core only slows a run)
    f()
    times = []
    for _ in range(8):
        t0 = time.perf_counter(); f(); times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times) / 1e9
out = {}
for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
    a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
    if dt == torch.bfloat16:
        # Without AVX-512 BF16 a 4096^2 bf16 mm takes ~100 s: a 1024^2 probe first, and the big
        # one only where bf16 is not far behind fp32.
        m = 1024
        t0 = time.perf_counter(); torch.mm(a[:m, :m], b[:m, :m]); probe = 2 * m ** 3 / (time.perf_counter() - t0) / 1e9
        if probe < 0.25 * out["fp32"]:
            out["bf16_native"] = probe
            out[name] = out["fp32"]  # a bf16 product through the fp32 GEMM, as auto picks there
            continue
    out[name] = best_of_8(lambda: torch.mm(a, b))
    if dt == torch.float32 and torch.backends.mkldnn.is_available():
        # The oneDNN kernel ShardTune's frozen fp32 GEMMs may use (ops/cpu_ops.cpp): the peak is
        # the faster of the two, so MFU is never measured against the slower kernel.
        onednn = best_of_8(lambda: torch.ops.aten.mkldnn_linear_backward_input([n, n], a.to_mkldnn(), b).to_dense())
        out["fp32_blas"], out["fp32_onednn"] = out[name], onednn
        out[name] = max(out[name], onednn)
    if dt == torch.bfloat16:
        out["bf16_native"] = out[name]
        out[name] = max(out[name], out["fp32"])  # a bf16 product through the fp32 GEMM
print(json.dumps(out))
EOF
echo "# matmul peak (GFLOP/s, 4096^2, best of 8): $(cat "$OUT/matmul.json"); model FLOPs/step: $FLOPS TFLOP" >&2

for p in $PRECISIONS; do
  for ((r = 1; r <= ROUNDS; r++)); do
    echo "  $p round $r: C++ ..." >&2
    run_cpp "$p" "$r"
    echo "  $p round $r: Python ..." >&2
    run_py "$p" "$r"
  done
done

"$PY" - "$RESULTS" "$PRECISIONS" "$BF16_STYLE" "$SMALL_EVAL" "$OUT/matmul.json" "$FLOPS" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
peak = json.load(open(sys.argv[5]))
tflop = float(sys.argv[6])
print("| precision | C++ median step | Python median step | C++/Python | C++ MFU | Python MFU | matmul peak | C++ peak RSS | Python peak RSS |")
print("|---|---|---|---|---|---|---|---|---|")
for p in sys.argv[2].split():
    c = [r for r in rows if r["impl"] == "cpp" and r["precision"] == p]
    y = [r for r in rows if r["impl"] == "python" and r["precision"] == p]
    cs = statistics.median(r["step_time_s"] for r in c)
    ys = statistics.median(r["step_time_s"] for r in y)
    label = p if p != "bf16" else f"bf16 (Python: {sys.argv[3]})"
    mfu = lambda t: tflop * 1e3 / t / peak[p]
    print(f"| {label} | {cs:.3f} s | {ys:.3f} s | {cs / ys:.2f} | {mfu(cs):.0%} | {mfu(ys):.0%} | {peak[p]:.0f} GFLOP/s "
          f"| {max(r['peak_rss_mb'] for r in c):,.0f} MB | {max(r['peak_rss_mb'] for r in y):,.0f} MB |")
if not int(sys.argv[4]):
    print()
    print("note: the C++ peak RSS includes the held val/test sets and the final eval (256-image chunks, no grad);"
          " python_step.py measures the step only. --small-eval makes the C++ figure the step's.")
print()
print("per run (s): " + "; ".join(
    f"{p} C++ " + ", ".join(f"{r['step_time_s']:.3f}" for r in rows if r["impl"] == "cpp" and r["precision"] == p)
    + " / Python " + ", ".join(f"{r['step_time_s']:.3f}" for r in rows if r["impl"] == "python" and r["precision"] == p)
    for p in sys.argv[2].split()))
EOF
