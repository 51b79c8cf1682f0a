#!/usr/bin/env bash
# The image loader against torchvision: `shardtune data --benchmark` vs ImageFolder +
# DataLoader(num_workers=2) with the same transform, on the same folder of JPEGs (made here:
# photo-like, about 500 x 375, 10 classes), alternating A B A B in one run; with the host's
# fp32 4096^2 matmul rate measured in the same run.
# usage: bench/data_vs_torchvision.sh SHARDTUNE [IMAGES=2000] [BATCHES=25] [WORKERS=2]
set -euo pipefail
st=$1 n=${2:-2000} batches=${3:-25} workers=${4:-2}
py=/usr/bin/python3
work=${WORK:-/tmp/shardtune_data_bench}
mkdir -p "$work"
if [[ ! -f $work/done_$n ]]; then
  rm -rf "$work/img"
  $py - "$work/img" "$n" <<'PY'
import os, sys
import numpy as np
from PIL import Image, ImageDraw, ImageFilter
root, n = sys.argv[1], int(sys.argv[2])
for split, count in (("train", n), ("test", 20)):
    for i in range(count):
        r = np.random.default_rng(i + (0 if split == "train" else 10**6))
        w, h = (500, 375) if i % 3 else (375, 500)
        img = Image.new("RGB", (w, h), tuple(int(v) for v in r.integers(0, 255, 3)))
        d = ImageDraw.Draw(img)
        for _ in range(20):
            x0, y0 = int(r.integers(0, w)), int(r.integers(0, h))
            d.ellipse([x0, y0, x0 + int(r.integers(20, 250)), y0 + int(r.integers(20, 250))], fill=tuple(int(v) for v in r.integers(0, 255, 3)))
        a = np.asarray(img.filter(ImageFilter.GaussianBlur(2))).astype(np.int16) + r.integers(-10, 11, (h, w, 3))
        d = os.path.join(root, split, f"class_{i % 10}")
        os.makedirs(d, exist_ok=True)
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(os.path.join(d, f"{i:05d}.jpg"), quality=90)
PY
  touch "$work/done_$n"
fi
cat >"$work/bench.ini" <<INI
[model]
arch = vit
image_size = 224
in_chans = 3
patch_size = 16
dim = 64
depth = 1
heads = 1
mlp_dim = 64
num_classes = 10
[data]
dataset = imagefolder
root = $work/img
batch_size = 64
INI

matmul() {
  $py -c "
import time, torch
a = torch.randn(4096, 4096); b = torch.randn(4096, 4096); a @ b
t = time.perf_counter(); [a @ b for _ in range(3)]; s = (time.perf_counter() - t) / 3
print(f'{2 * 4096**3 / s / 1e9:.0f}')"
}

torchvision_ips() {  # $1: transform
  $py - "$work/img/train" "$1" "$batches" "$workers" <<'PY'
import sys, time, torch, torchvision
from torchvision import transforms as T
root, kind, batches, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
norm = [T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
bil = T.InterpolationMode.BILINEAR
tf = {"timm_eval": T.Compose([T.Resize(256, bil), T.CenterCrop(224)] + norm),
      "timm_train": T.Compose([T.RandomResizedCrop(224, interpolation=bil), T.RandomHorizontalFlip()] + norm),
      "vtab": T.Compose([T.Resize((224, 224), bil)] + norm)}[kind]
torch.manual_seed(0)
dl = torch.utils.data.DataLoader(torchvision.datasets.ImageFolder(root, tf), batch_size=64, shuffle=True,
                                 num_workers=workers, drop_last=True, persistent_workers=True)
it = iter(dl); next(it)  # the first batch starts the workers: not timed, as for shardtune
t = time.perf_counter()
for _ in range(batches):
    try:
        next(it)
    except StopIteration:
        it = iter(dl); next(it)
print(f"{batches * 64 / (time.perf_counter() - t):.1f}")
PY
}

shardtune_ips() {  # $1: transform
  "$st" data --config "$work/bench.ini" --benchmark "$batches" --data.workers "$workers" --data.transform "$1" --log-level warn |
    tail -1 | $py -c "import json, sys; print(f\"{json.load(sys.stdin)['images_per_sec']:.1f}\")"
}

echo "host: $(nproc) cores; fp32 4096^2 matmul: $(matmul) GFLOP/s"
echo "images: $n JPEGs ~500x375 in $work/img; batch 64, $batches timed batches, $workers workers each"
printf "%-11s %-6s %14s %14s\n" transform round shardtune torchvision
for kind in timm_eval timm_train; do
  for round in 1 2; do
    a=$(shardtune_ips $kind) b=$(torchvision_ips $kind)
    printf "%-11s %-6s %14s %14s\n" "$kind" "$round" "$a" "$b"
  done
done
echo "host after: fp32 4096^2 matmul: $(matmul) GFLOP/s"
