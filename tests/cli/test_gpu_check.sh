#!/usr/bin/env bash
# scripts/gpu_check.sh on a machine without a GPU: shellcheck-clean, its --dry-run plan lists
# every step in order with its limit, usage errors exit 2, and a real run fails at the probe,
# says so with the log's lines, skips what needs it and still writes the JSON report.
# usage: test_gpu_check.sh GPU_CHECK_SH WORKDIR
set -u
script=$1 work=$2
rm -rf "$work" && mkdir -p "$work"
source "$(dirname "$0")/lib.sh"

if command -v shellcheck >/dev/null; then
  expect 0 "" -- shellcheck "$script"
else
  echo "note: shellcheck is not installed; its check is left out"
fi
expect 0 "gpu_check plan: 9 steps within 470s.*probe .*matmul .*configure .*-DCMAKE_PREFIX_PATH=.*build .*--target shardtune shardtune_tests shardtune_gpu_tests.*nccl_np1 .*-n 1 .*shardtune_gpu_tests.*vit_b16 .*--parallel.device cuda.*vit_base_patch16_224.*--train.steps 20.*vit_g14 .*vit_giant_patch14_224.*unit .*nccl_np2 .*-n 2" -- \
  bash "$script" --dry-run --build-dir "$work/plan"
[[ ! -e "$work/plan" ]] && pass "the dry run creates nothing" || failed "the dry run wrote $work/plan"
expect 0 "within 120s" -- bash "$script" --dry-run --budget 120
expect 2 "unknown option '--bogus'" -- bash "$script" --bogus
expect 2 "--budget=soon is not a number of seconds" -- bash "$script" --dry-run --budget soon

# Without nvidia-smi on PATH the probe fails; everything after it is skipped, nothing hangs.
mkdir -p "$work/bin"
for t in bash timeout tail sed grep cat dirname nproc mkdir printf env; do
  p=$(command -v "$t") && ln -sf "$p" "$work/bin/$t"
done
for p in /usr/bin/python3 "$(command -v python3)"; do  # a real interpreter, not a shim that needs PATH
  [[ -x $p ]] && { ln -sf "$p" "$work/bin/python3"; break; }
done
expect 1 "== probe .*FAILED \(probe, exit 1\) - the last lines of .*probe.log.*missing: nvidia-smi.*== build: skipped: configure skipped.*== vit_b16: skipped: build skipped.*1 failed step\(s\)" -- \
  env PATH="$work/bin" PYTHON=python3 bash "$script" --build-dir "$work/run" --budget 60
report=$work/run/gpu_check.json
python3 - "$report" <<'PY' && pass "the report says what failed and where" || failed "report $report"
import json, sys
r = json.load(open(sys.argv[1]))
s = r["steps"]
assert s["probe"]["status"] == "failed: exit 1", s["probe"]
assert s["probe"]["log"].endswith("gpu_check_logs/probe.log"), s["probe"]
assert s["configure"]["status"] == "skipped: probe failed", s["configure"]
assert s["nccl_np2"]["status"] == "skipped: nccl_np1 skipped", s["nccl_np2"]
assert r["runs"] == {"vit_b16": None, "vit_g14": None}, r["runs"]
assert list(s) == ["probe", "matmul", "configure", "build", "nccl_np1", "vit_b16", "vit_g14", "unit", "nccl_np2"]
PY
finish
