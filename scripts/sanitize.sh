#!/usr/bin/env bash
# Memory-safety check: ShardTune built with -fsanitize=address,undefined in build-asan/ (a
# build of its own, incremental), then the unit tests and short training runs (fp32 and bf16,
# stopped by a signal and resumed) under it. Any ASan or UBSan report fails the script.
#   scripts/sanitize.sh            # ~20 min on 2 cores the first time (a clean build)
# Not in .ci/run: the second, instrumented build would double CI's build time. ASan does not
# see masked AVX-512 loads and stores, nor a signal frame written by the kernel; the guard-page
# test (Kernels.TailsStayInsideTheirBuffersAtBothEnds) and the signal flood (train.signal_flood)
# in the normal suite cover those.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null  # the packages (and the normal build)

flags="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
if [[ ! -f build-asan/CMakeCache.txt ]]; then
  cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS="$flags" \
    -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" >/dev/null
fi
# (LibTorch's headers warn under the sanitizers' instrumentation: the log keeps them.)
cmake --build build-asan -j"$(nproc)" --target shardtune shardtune_tests >build-asan/build.log 2>&1 ||
  { grep -E "error|Error" build-asan/build.log | tail -20; exit 1; }

# LibTorch's own allocations outlive main (leak reports would be its, not ours).
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:strict_string_checks=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export OMP_NUM_THREADS=2
build-asan/tests/shardtune_tests --gtest_brief=1

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
source tests/cli/lib.sh
tiny_run_ini 2 >"$work/tiny.ini"
for precision in fp32 bf16; do
  build-asan/shardtune train --config "$work/tiny.ini" --output.dir "$work/$precision" --train.precision "$precision" \
    --train.exit_interval 3 --output.checkpoint_every 1
  build-asan/shardtune train --config "$work/tiny.ini" --output.dir "$work/$precision" --train.precision "$precision"
done
build-asan/shardtune train --config "$work/tiny.ini" --output.dir "$work/sig" --train.steps 100000 >"$work/sig.log" 2>&1 &
pid=$!
for _ in $(seq 600); do grep -q "train: vit" "$work/sig.log" && break; sleep 0.1; done
sleep 2
kill -TERM $pid
wait $pid || { tail -20 "$work/sig.log"; exit 1; }
grep -q "stopping at step .* (signal)" "$work/sig.log"
echo "sanitize: unit tests and training runs clean under ASan + UBSan"
