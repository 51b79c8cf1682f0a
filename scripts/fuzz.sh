#!/usr/bin/env bash
# Builds the libFuzzer target for the safetensors header parser with clang (ASan + UBSan)
# and runs it for a bounded time. usage: scripts/fuzz.sh [SECONDS]   (default 60)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
command -v clang++ >/dev/null || { echo "fuzz.sh: clang++ is not installed (apt-get install clang)"; exit 1; }
CXX=clang++ cmake -S . -B build-fuzz -DSHARDTUNE_BUILD_FUZZERS=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build-fuzz -j"$(nproc)" >/dev/null
corpus=build-fuzz/corpus
mkdir -p "$corpus"
cp fuzz/corpus/* "$corpus"/ 2>/dev/null || true
./build-fuzz/fuzz/fuzz_safetensors_header "$corpus" -max_total_time="$secs" -max_len=4096 -print_final_stats=1 2>&1 \
  | grep -E "^(stat::|#[0-9]+ *DONE|INFO: Done|==[0-9]+==ERROR|SUMMARY)" || true
