#!/usr/bin/env bash
# The GPU path proved in one run (under 8 minutes) on a machine with an NVIDIA GPU, CUDA
# PyTorch and the nvidia-nccl-cu12 Python package: builds the CUDA variant in build-gpu/
# against PyTorch's LibTorch, then runs
#   nccl_np1   the NCCL process group's every verb and dtype, world size 1 (tests/gpu)
#   vit_b16    a 20-step ViT-B/16 LoRA bf16 run on synthetic data, parallel.device=cuda
#   vit_g14    a ViT-g/14 LoRA bf16 run that fits one GPU
#   unit       the unit tests in the CUDA build
#   nccl_np2   the NCCL tests with 2 processes on one GPU (NCCL may refuse: recorded as such)
# and writes every figure (step time, images/s, MFU, peak device memory, the GPU's bf16
# matmul rate) and every step's status, time and log to one JSON file. A failed step is
# printed with its log's tail and the run goes on with the steps that do not need it.
#
# usage: scripts/gpu_check.sh [--dry-run] [--out FILE] [--build-dir DIR] [--jobs N] [--budget S]
#   --dry-run   print the plan (every step, its time limit and command) and exit 0
#   --out       the JSON file (default BUILD_DIR/gpu_check.json)
#   --budget    seconds for the whole run (default 470); a step gets what is left, capped
# Environment: PYTHON (default python3), the interpreter with CUDA PyTorch.
set -u -o pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dry_run=0 build_dir=$root/build-gpu out="" jobs=$(nproc 2>/dev/null || echo 4) budget=470
python=${PYTHON:-python3}

while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) dry_run=1 ;;
    --out) out=$2; shift ;;
    --build-dir) build_dir=$2; shift ;;
    --jobs) jobs=$2; shift ;;
    --budget) budget=$2; shift ;;
    -h | --help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ $budget =~ ^[0-9]+$ ]] || { echo "gpu_check.sh: --budget=$budget is not a number of seconds" >&2; exit 2; }
out=${out:-$build_dir/gpu_check.json}
logs=$build_dir/gpu_check_logs
start=$SECONDS

# --- what this machine has ---------------------------------------------------------------

# One value from the CUDA PyTorch's interpreter, empty when it cannot say.
py() { "$python" -c "$1" 2>/dev/null; }
torch_prefix=$(py 'import torch; print(torch.utils.cmake_prefix_path)')
nccl_dir=$(py 'import nvidia.nccl, os; print(list(nvidia.nccl.__path__)[0])')
cuda_root=""
for c in "${CUDA_HOME:-}" /usr/local/cuda "$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /x/x)")")"; do
  [[ -n $c && -x $c/bin/nvcc ]] && { cuda_root=$c; break; }
done

configure=(cmake -S "$root" -B "$build_dir" -DCMAKE_BUILD_TYPE=Release
  "-DCMAKE_PREFIX_PATH=${torch_prefix:-<torch.utils.cmake_prefix_path>}")
[[ -n $cuda_root ]] && configure+=("-DCUDAToolkit_ROOT=$cuda_root" "-DCUDA_TOOLKIT_ROOT_DIR=$cuda_root")
build=(cmake --build "$build_dir" -j "$jobs" --target shardtune shardtune_tests shardtune_gpu_tests)
st=$build_dir/shardtune
mpirun=(mpiexec --allow-run-as-root --oversubscribe)
train=("$st" train --peft.method lora --data.dataset synthetic --train.precision bf16 --parallel.device cuda
  --parallel.backend auto --train.log_every 5 --data.val_samples 0 --data.eval_samples 64 --model.num_classes 10)
declare -A cmd limit
# Each missing piece says what it is, then the step fails.
need() { printf '{ %s || { echo "missing: %s"; false; }; }' "$1" "$2"; }
cmd[probe]="$(need "nvidia-smi -L" "nvidia-smi (no NVIDIA driver?)") && $(need "command -v cmake mpiexec c++" "cmake, mpiexec or c++") && $python -c 'import torch; assert torch.cuda.is_available(), \"torch.cuda.is_available() is False\"; assert torch.compiled_with_cxx11_abi(), \"this torch uses the pre-C++11 ABI, the system libraries (Boost, spdlog, GTest) the C++11 one: use torch 2.6 or newer\"; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))' && $(need "test -n '$torch_prefix'" "CUDA PyTorch's torch.utils.cmake_prefix_path from $python") && $(need "test -f '$nccl_dir/lib/libnccl.so.2'" "libnccl.so.2 of the nvidia-nccl-cu12 package") && $(need "test -f '$nccl_dir/include/nccl.h'" "nccl.h of the nvidia-nccl-cu12 package")"
cmd[matmul]="$python -c 'import torch,time; a=torch.randn(8192,8192,device=\"cuda\",dtype=torch.bfloat16); b=a@a; torch.cuda.synchronize(); t=time.time(); [a@a for _ in range(20)]; torch.cuda.synchronize(); print(\"bf16_matmul_tflops\", 20*2*8192**3/(time.time()-t)/1e12)'"
cmd[configure]="${configure[*]}"
cmd[build]="${build[*]}"
cmd[nccl_np1]="${mpirun[*]} -n 1 $build_dir/tests/shardtune_gpu_tests --gtest_brief=1"
cmd[vit_b16]="${train[*]} --model.arch vit_base_patch16_224 --data.batch_size 64 --data.train_samples 512 --train.steps 20 --output.dir $build_dir/run_vit_b16"
cmd[vit_g14]="${train[*]} --model.arch vit_giant_patch14_224 --data.batch_size 32 --data.train_samples 256 --train.steps 10 --output.dir $build_dir/run_vit_g14"
cmd[unit]="$build_dir/tests/shardtune_tests --gtest_brief=1"
cmd[nccl_np2]="${mpirun[*]} -n 2 $build_dir/tests/shardtune_gpu_tests --gtest_brief=1 --gtest_filter=GpuNccl.*"
limit=([probe]=60 [matmul]=30 [configure]=90 [build]=300 [nccl_np1]=60 [vit_b16]=90 [vit_g14]=150 [unit]=120 [nccl_np2]=60)
order=(probe matmul configure build nccl_np1 vit_b16 vit_g14 unit nccl_np2)
# What each step needs to have passed first.
declare -A needs=([matmul]=probe [configure]=probe [build]=configure [nccl_np1]=build [vit_b16]=build
  [vit_g14]=build [unit]=build [nccl_np2]=nccl_np1)

if [[ $dry_run -eq 1 ]]; then
  echo "gpu_check plan: ${#order[@]} steps within ${budget}s, JSON to $out, logs in $logs"
  echo "  torch cmake prefix: ${torch_prefix:-(not found: $python has no torch)}"
  echo "  NCCL: ${nccl_dir:-(not found: no nvidia-nccl-cu12 package)}; CUDA toolkit: ${cuda_root:-(not found)}"
  for s in "${order[@]}"; do
    printf '  %-10s up to %3ss%s\n    %s\n' "$s" "${limit[$s]}" "${needs[$s]:+, after ${needs[$s]}}" "${cmd[$s]}"
  done
  exit 0
fi

# --- the run -------------------------------------------------------------------------------

mkdir -p "$logs"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
[[ -n $nccl_dir ]] && export LD_LIBRARY_PATH="$nccl_dir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
declare -A status seconds
failures=0
for s in "${order[@]}"; do
  left=$((budget - (SECONDS - start)))
  dep=${needs[$s]:-}
  if [[ -n $dep && ${status[$dep]} != passed ]]; then
    status[$s]="skipped: $dep ${status[$dep]%%:*}"; seconds[$s]=0
    echo "== $s: ${status[$s]}"; continue
  fi
  if [[ $left -lt 5 ]]; then
    status[$s]="skipped: out of time"; seconds[$s]=0; echo "== $s: skipped, the ${budget}s budget is spent"; continue
  fi
  cap=${limit[$s]}; [[ $left -lt $cap ]] && cap=$left
  echo "== $s (up to ${cap}s): ${cmd[$s]}"
  t0=$SECONDS
  timeout --kill-after=5 "$cap" bash -c "${cmd[$s]}" >"$logs/$s.log" 2>&1
  rc=$?
  seconds[$s]=$((SECONDS - t0))
  if [[ $rc -eq 0 ]]; then
    status[$s]=passed; echo "   passed in ${seconds[$s]}s"
  elif [[ $s == nccl_np2 ]] && grep -qiE 'duplicate GPU|invalid usage' "$logs/$s.log"; then
    status[$s]="refused: NCCL does not allow 2 ranks on one GPU"; echo "   ${status[$s]}"
  else
    [[ $rc -eq 124 || $rc -eq 137 ]] && status[$s]="failed: timed out after ${cap}s" || status[$s]="failed: exit $rc"
    failures=$((failures + 1))
    echo "   FAILED ($s, ${status[$s]#failed: }) - the last lines of $logs/$s.log:"
    tail -n 25 "$logs/$s.log" | sed 's/^/     | /'
  fi
done

# --- one JSON file -------------------------------------------------------------------------

steps_tsv=$logs/steps.tsv
: >"$steps_tsv"
for s in "${order[@]}"; do printf '%s\t%s\t%s\t%s\n' "$s" "${status[$s]}" "${seconds[$s]}" "$logs/$s.log" >>"$steps_tsv"; done
"$python" - "$steps_tsv" "$build_dir" "$out" "$((SECONDS - start))" <<'PY' || { echo "could not write $out"; failures=$((failures + 1)); }
import json, os, re, sys
tsv, build, out, total = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
report = {"total_seconds": total, "steps": {}, "runs": {}}
for line in open(tsv):
    name, status, secs, log = line.rstrip("\n").split("\t")
    report["steps"][name] = {"status": status, "seconds": int(secs), "log": log}
def grep(log, pattern):
    try:
        m = re.search(pattern, open(log, errors="replace").read())
        return m.group(1) if m else None
    except OSError:
        return None
tf = grep(report["steps"]["matmul"]["log"], r"bf16_matmul_tflops ([0-9.]+)")
report["bf16_matmul_8192_tflops"] = float(tf) if tf else None
report["gpu"] = (grep(report["steps"]["probe"]["log"], r"GPU 0: ([^\n(]+)") or "").strip() or None
keys = ["device_name", "backend", "precision", "step_time_s", "images_per_sec", "mfu", "bf16_peak_tflops",
        "model_tflops_per_step", "peak_device_memory_mb", "peak_rss_mb", "trainable_params", "total_params", "steps"]
for run in ("vit_b16", "vit_g14"):
    path = os.path.join(build, "run_" + run, "summary.json")
    try:
        summary = json.load(open(path))
    except (OSError, ValueError):
        report["runs"][run] = None
        continue
    report["runs"][run] = {k: summary.get(k) for k in keys}
os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
with open(out, "w") as f:
    json.dump(report, f, indent=2)
    f.write("\n")
PY
echo "gpu_check: $failures failed step(s) in $((SECONDS - start))s; figures in $out"
[[ $failures -eq 0 ]]
