#!/usr/bin/env bash
# Makes a fresh Debian bookworm machine ready and builds ShardTune, incrementally:
# installs the missing apt packages (none when all are present), configures build/ once,
# then builds (a second run rebuilds nothing). Sourced or run by scripts/main.sh and
# scripts/test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

packages=(
  g++ make cmake zlib1g-dev
  libtorch-dev libopenblas0-openmp          # LibTorch 1.13 (CPU) on OpenBLAS, not the reference BLAS
  libdnnl-dev                               # headers of the oneDNN 2.6 LibTorch links (ops/onednn_matmul.h)
  libopenmpi-dev openmpi-bin
  libboost-program-options-dev libspdlog-dev libgtest-dev
  dataset-fashion-mnist
  libturbojpeg0-dev libpng-dev nlohmann-json3-dev   # image decoding (issue 18), classes.json
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  sudo=""
  [[ $(id -u) -eq 0 ]] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
    $sudo apt-get update >/dev/null
    $sudo apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null
  }
fi

if [[ ! -f build/CMakeCache.txt ]]; then
  cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
fi
cmake --build build -j"$(nproc)" 2>&1 | grep -Ev "^\[ *[0-9]+%\] (Built target|Building|Linking)|^Consolidate" || true
test -x build/shardtune  # the build above must have produced the binary
