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


jobs = []  # (path, kind, interp, size, chans): all through one testkit process


def run_all():
    args = []
    for k, (path, kind, interp, size, chans) in enumerate(jobs):
        args += [path, kind, interp, str(size), str(chans), os.path.join(work, f"out{k}.bin")]
    res = subprocess.run([kit, "transform"] + args, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr)
    out = []
    for k, (line, job) in enumerate(zip(res.stdout.split("\n"), jobs)):
        shape = [int(v) for v in line.split()]
        raw = open(os.path.join(work, f"out{k}.bin"), "rb").read()
        if job[1] == "decode":
            out.append(np.frombuffer(raw, np.uint8).reshape(shape))
        else:
            out.append(torch.from_numpy(np.frombuffer(raw, np.float32).copy().reshape(shape)))
    return out


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

checks = []  # (what, reference, tolerance, how to compare)
for name in files:
    path = os.path.join(work, name)
    ref = Image.open(path)
    if name == "grey16.png":  # PIL reads I;16 as mode I: the 8-bit value is the high byte
        jobs.append((path, "decode", "bilinear", 0, 1))
        checks.append((f"{name}: decoded = PIL's high byte", (np.asarray(ref).astype(np.int64) >> 8)[:, :, None], 0))
        continue
    for chans, mode in [(3, "RGB"), (1, "L")]:
        jobs.append((path, "decode", "bilinear", 0, chans))
        want = np.asarray(ref.convert(mode)).reshape(ref.size[1], ref.size[0], chans)
        checks.append((f"{name} as {mode}: decoded vs PIL", want, 1 if name == "cmyk.jpg" else 0))

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
            jobs.append((path, kind, interp, size, 3))
            checks.append((f"{name} {kind} {interp} {size} vs torchvision antialias=True", ref, 1 / 255))

for (what, want, tol), got in zip(checks, run_all()):
    if isinstance(got, np.ndarray):
        err = float(np.abs(got.astype(np.int64) - want.astype(np.int64)).max()) if got.shape == want.shape else float("inf")
        check(err <= tol, f"{what}: max error {err:.0f} levels (<= {tol})")
    else:
        err = float((got - want).abs().max()) if got.shape == want.shape else float("inf")
        check(err <= tol, f"{what}: max error {err * 255:.3f}/255 (<= 1/255)")

print(f"{fails} failure(s)")
sys.exit(1 if fails else 0)
