#!/usr/bin/python3
"""ShardTune's decoding and transforms against PIL and torchvision (Debian's python3-pil and
python3-torchvision; exit 77, a skip, without them).

Images are made here: photo-like RGB (smooth shapes, blur and noise), grey, CMYK JPEGs and
palette, 16-bit, grey+alpha, RGBA PNGs. Decoding must equal PIL's (the same libjpeg-turbo),
within 1 level for CMYK; vtab/timm_eval resizes within 1/255 of torchvision's antialias=True
on the decoded tensor (bicubic clipped to [0, 1] as ShardTune does).
usage: check_vs_torchvision.py TESTKIT WORKDIR"""
import os
import subprocess
import sys

try:
    import numpy as np
    import torch
    from PIL import Image, ImageDraw, ImageFilter
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode
except ImportError as e:
    print(f"skipping: {e}")
    sys.exit(77)

kit, work = sys.argv[1], sys.argv[2]
os.makedirs(work, exist_ok=True)
rng = np.random.default_rng(0)
fails = 0


def check(ok, what):
    global fails
    print(("ok: " if ok else "FAIL: ") + what)
    fails += 0 if ok else 1


def photo(w, h, seed):
    r = np.random.default_rng(seed)
    img = Image.new("RGB", (w, h), tuple(int(v) for v in r.integers(0, 255, 3)))
    d = ImageDraw.Draw(img)
    for _ in range(25):
        x0, y0 = int(r.integers(0, w)), int(r.integers(0, h))
        box = [x0, y0, x0 + int(r.integers(10, w // 2)), y0 + int(r.integers(10, h // 2))]
        fill = tuple(int(v) for v in r.integers(0, 255, 3))
        (d.ellipse if r.random() < 0.5 else d.rectangle)(box, fill=fill)
    img = img.filter(ImageFilter.GaussianBlur(1.5))
    a = np.asarray(img).astype(np.int16) + r.integers(-12, 13, (h, w, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def run(path, kind, interp, size, chans):
    out = os.path.join(work, "out.bin")
    res = subprocess.run([kit, "transform", path, kind, interp, str(size), str(chans), out], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr)
    shape = [int(v) for v in res.stdout.split()]
    raw = open(out, "rb").read()
    if kind == "decode":
        return np.frombuffer(raw, np.uint8).reshape(shape[0], shape[1], shape[2])
    return torch.from_numpy(np.frombuffer(raw, np.float32).copy().reshape(shape))


# --- decoding --------------------------------------------------------------------------
files = {}
for i, (w, h) in enumerate([(500, 375), (375, 500), (97, 61)]):
    p = photo(w, h, i)
    for q, sub in [(90, 0), (75, 2)]:
        files[f"rgb{i}_q{q}.jpg"] = (p, dict(quality=q, subsampling=sub))
files["grey.jpg"] = (photo(120, 90, 7).convert("L"), dict(quality=85))
files["cmyk.jpg"] = (photo(64, 48, 8).convert("CMYK"), dict(quality=95))
files["palette.png"] = (photo(80, 60, 9).convert("P", palette=Image.ADAPTIVE, colors=37), {})
files["rgba.png"] = (photo(50, 40, 10).convert("RGBA"), {})
files["la.png"] = (photo(50, 40, 11).convert("LA"), {})
files["rgb.png"] = (photo(70, 45, 12), {})
i16 = Image.fromarray((rng.integers(0, 65535, (30, 20))).astype(np.uint16))
files["grey16.png"] = (i16, {})
for name, (img, kw) in files.items():
    img.save(os.path.join(work, name), **kw)

for name in files:
    path = os.path.join(work, name)
    ref = Image.open(path)
    if name == "grey16.png":  # PIL reads I;16 as mode I: the 8-bit value is the high byte
        want_l = (np.asarray(ref).astype(np.int64) >> 8).astype(np.uint8)
        got = run(path, "decode", "bilinear", 0, 1)[:, :, 0]
        check(np.array_equal(got, want_l), f"{name}: decoded = PIL's high byte")
        continue
    for chans, mode in [(3, "RGB"), (1, "L")]:
        want = np.asarray(ref.convert(mode)).reshape(ref.size[1], ref.size[0], chans).astype(np.int16)
        got = run(path, "decode", "bilinear", 0, chans).astype(np.int16)
        err = int(np.abs(got - want).max())
        tol = 1 if name == "cmyk.jpg" else 0
        check(got.shape == want.shape and err <= tol, f"{name} as {mode}: max |ShardTune - PIL| = {err} (<= {tol})")

# --- transforms ------------------------------------------------------------------------
modes = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}
for name in ["rgb0_q90.jpg", "rgb1_q75.jpg", "rgb2_q90.jpg", "grey.jpg", "rgb.png"]:
    path = os.path.join(work, name)
    x = TF.to_tensor(Image.open(path).convert("RGB"))
    for interp, mode in modes.items():
        for kind, size in [("vtab", 224), ("vtab", 32), ("timm_eval", 224), ("timm_eval", 48)]:
            if kind == "vtab":
                ref = TF.resize(x, [size, size], mode, antialias=True)
            else:
                ref = TF.center_crop(TF.resize(x, int(size / 0.875), mode, antialias=True), size)
            if interp == "bicubic":
                ref = ref.clamp(0, 1)
            got = run(path, kind, interp, size, 3)
            err = float((got - ref).abs().max()) if got.shape == ref.shape else float("inf")
            check(err <= 1 / 255, f"{name} {kind} {interp} {size}: max |ShardTune - torchvision| = {err * 255:.3f}/255")

print(f"{fails} failure(s)")
sys.exit(1 if fails else 0)
