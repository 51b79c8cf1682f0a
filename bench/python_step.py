#!/usr/bin/python3
"""Python PyTorch eager baseline of ShardTune's LoRA training step (issue 8).

The same model and step as `shardtune train --peft.method lora` on the synthetic set, written
the way a Python user would write it: a timm-style ViT (patch_embed conv, cls token +
pos_embed, pre-norm blocks with a fused qkv Linear, attention as (q * scale) @ k^T -> softmax
-> @ v -> proj, LayerNorm eps 1e-6, MLP fc1 -> exact GELU -> fc2, final norm on the cls token,
head Linear), LoRA on the q and v parts of every fused qkv as the LoRA-ViT / loralib code does
it (base qkv, then B(A x) * alpha/r added into the q and v slices), backbone frozen
(requires_grad False), head trainable, AdamW, cross-entropy, global-norm clipping at 1.0 and
the cosine lr schedule (ShardTune's defaults, see trainer/trainer.h).

Prints one JSON line:
  {"impl": "python_eager", "precision": ..., "step_time_s": median after warm-up,
   "images_per_s": ..., "peak_rss_mb": ru_maxrss in 10^6 bytes, "steps": ...}

Run with Debian's interpreter (/usr/bin/python3, package python3-torch: the same
libtorch_cpu.so.1.13 that build/shardtune links), e.g.
  /usr/bin/python3 bench/python_step.py --arch vit_base_patch16_224 --precision bf16 --steps 6
"""

# --- glibc malloc tuning: the same as the C++ binary (common/runtime.cpp configure_runtime:
# mallopt(M_MMAP_THRESHOLD, 32 MiB) and mallopt(M_TRIM_THRESHOLD, 1 GiB); and, once the model
# and data are built, common/runtime.cpp reuse_large_blocks: mallopt(M_MMAP_MAX, 0) unless
# MALLOC_MMAP_MAX_ is set, so blocks above 32 MiB are reused from the heap too), applied before
# torch is imported so both processes allocate under the same policy. Large activation
# buffers (< 32 MiB) then come from the heap and are reused instead of being mmap'ed and
# unmapped (page faults) every step, and freed memory is not trimmed back to the OS. The
# env vars MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ would do the same; we call mallopt
# so the script is fair whatever the environment. --no-malloc-tuning turns it off.
import ctypes
import sys

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4


def tune_malloc():
    libc = ctypes.CDLL("libc.so.6")
    ok1 = libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
    ok2 = libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    return ok1 == 1 and ok2 == 1


def reuse_large_blocks():
    import os
    if _MALLOC_TUNED and "MALLOC_MMAP_MAX_" not in os.environ:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_MAX, 0)


_MALLOC_TUNED = "--no-malloc-tuning" not in sys.argv and tune_malloc()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# name: (dim, depth, heads, mlp_dim, patch) -- the same presets as models/vit_config.cpp
ARCHS = {
    "vit_tiny_patch16_224": (192, 12, 3, 768, 16),
    "vit_small_patch16_224": (384, 12, 6, 1536, 16),
    "vit_base_patch16_224": (768, 12, 12, 3072, 16),
    "vit_large_patch16_224": (1024, 24, 16, 4096, 16),
    "vit_smoke": (192, 2, 3, 768, 16),  # quick checks: vit_tiny with depth 2
}


def trunc_normal_(t, std=0.02):
    return nn.init.trunc_normal_(t, std=std, a=-2 * std, b=2 * std)


CAST_LIKE = False  # set by --bf16-style cast


def wcast(w, x):
    """A parameter in x's dtype, like ShardTune's cast_like, only with --bf16-style cast. Otherwise
    (fp32, autocast) the parameter as is: the plain timm code path."""
    return w if not CAST_LIKE or w is None or w.dtype == x.dtype else w.to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear whose weights follow the input dtype (a no-op in fp32 and under autocast)."""

    def forward(self, x):
        return F.linear(x, wcast(self.weight, x), wcast(self.bias, x))


class LayerNorm(nn.LayerNorm):
    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, wcast(self.weight, x), wcast(self.bias, x), self.eps)


class LoraQKV(nn.Module):
    """LoRA on the q and v parts of a fused qkv Linear (LoRA-ViT / loralib MergedLinear style):
    qkv = W x + b; qkv[..., q] += B_q A_q x * s; qkv[..., v] += B_v A_v x * s."""

    def __init__(self, qkv: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.qkv = qkv
        dim = qkv.in_features
        self.dim = dim
        self.scaling = alpha / r
        # A [r, in] kaiming-uniform as nn.Linear (U(+-1/sqrt(in))), B [out, r] zeros
        self.lora_A_q = Linear(dim, r, bias=False)
        self.lora_B_q = Linear(r, dim, bias=False)
        self.lora_A_v = Linear(dim, r, bias=False)
        self.lora_B_v = Linear(r, dim, bias=False)
        nn.init.zeros_(self.lora_B_q.weight)
        nn.init.zeros_(self.lora_B_v.weight)

    def forward(self, x):
        qkv = self.qkv(x)
        dq = self.lora_B_q(self.lora_A_q(x))
        dv = self.lora_B_v(self.lora_A_v(x))
        qkv[..., : self.dim] += dq * self.scaling  # in place: addmm's backward does not need qkv
        qkv[..., 2 * self.dim:] += dv * self.scaling
        return qkv


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = Linear(dim, 3 * dim, bias=True)
        self.proj = Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, as torch::gelu's default
        self.fc2 = Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_dim):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch, in_chans, dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        x = F.conv2d(x, wcast(self.proj.weight, x), wcast(self.proj.bias, x), stride=self.proj.stride)
        return x.flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    def __init__(self, image_size, patch, in_chans, dim, depth, heads, mlp_dim, num_classes):
        super().__init__()
        self.patch_embed = PatchEmbed(patch, in_chans, dim)
        num_tokens = (image_size // patch) ** 2 + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_dim) for _ in range(depth)])
        self.norm = LayerNorm(dim, eps=1e-6)
        self.head = Linear(dim, num_classes)
        # timm's init (as models/vit.cpp init_weights)
        trunc_normal_(self.pos_embed)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, images):
        x = self.patch_embed(images)
        cls = wcast(self.cls_token, x).expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1) + wcast(self.pos_embed, x)
        x = self.blocks(x)
        return self.head(self.norm(x[:, 0]))


def add_lora(model, r, alpha):
    for p in model.parameters():
        p.requires_grad_(False)
    for blk in model.blocks:
        blk.attn.qkv = LoraQKV(blk.attn.qkv, r, alpha)  # new A/B require grad
    for p in model.head.parameters():
        p.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def lr_at(step, total, lr, warmup):
    """trainer.cpp lr_at: linear warm-up, then cosine decay to 0."""
    if step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, total - warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / span))


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6  # KiB on Linux -> 10^6 bytes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_base_patch16_224", choices=sorted(ARCHS))
    ap.add_argument("--depth", type=int, default=0, help="override the preset's depth")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--bf16-style", default="autocast", choices=["autocast", "cast"],
                    help="autocast: torch.autocast('cpu', bfloat16) around forward+loss (default, the natural "
                         "Python way); cast: frozen weights, activations and images stored in bf16, trainable "
                         "parameters fp32 cast on use (what `shardtune train --train.precision bf16` does)")
    ap.add_argument("--steps", type=int, default=6, help="timed steps + warm-up steps in all (like --train.steps)")
    ap.add_argument("--warmup", type=int, default=1, help="first steps left out of the median (C++: 1)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--train-samples", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=8.0)  # peft/peft_config.h: alpha = 8 -> scaling 1
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.0)  # trainer/trainer.h TrainConfig default
    ap.add_argument("--grad-clip", type=float, default=1.0)  # trainer/trainer.h TrainConfig default
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-malloc-tuning", action="store_true", help="skip the mallopt calls (see top of file)")
    ap.add_argument("--flush-denormal", action="store_true",
                    help="torch.set_flush_denormal(True) (FTZ/DAZ); the C++ binary does not set it")
    ap.add_argument("--verbose", action="store_true", help="per-step times and losses on stderr")
    ap.add_argument("--inference", action="store_true",
                    help="time the eval forward instead (model.eval(), torch.no_grad(), logits of --batch images "
                         "per 'step'), as `shardtune eval` / `predict` run it")
    args = ap.parse_args()
    if args.steps <= args.warmup:
        ap.error("--steps must exceed --warmup")

    torch.set_num_threads(args.threads)
    if args.flush_denormal:
        torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)
    dim, depth, heads, mlp_dim, patch = ARCHS[args.arch]
    depth = args.depth or depth
    model = VisionTransformer(args.image_size, patch, 3, dim, depth, heads, mlp_dim, args.num_classes)
    params = add_lora(model, args.rank, args.alpha)
    model.train(not args.inference)

    bf16_cast = args.precision == "bf16" and args.bf16_style == "cast"
    use_autocast = args.precision == "bf16" and args.bf16_style == "autocast"
    if bf16_cast:
        global CAST_LIKE
        CAST_LIKE = True
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)

    # Synthetic data like trainer/data.cpp: class prototypes + noise, random labels.
    g = torch.Generator().manual_seed(args.seed)
    labels = torch.randint(0, args.num_classes, (args.train_samples,), generator=g)
    protos = torch.randn(args.num_classes, 3, args.image_size, args.image_size, generator=g)
    images = protos.index_select(0, labels) + torch.randn(args.train_samples, 3, args.image_size, args.image_size,
                                                          generator=g)
    del protos

    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    reuse_large_blocks()  # as the C++ binary does once its model is loaded
    times, losses = [], []
    n = args.train_samples
    for step in range(args.steps):
        t0 = time.perf_counter()
        idx = torch.arange(step * args.batch, (step + 1) * args.batch) % n
        x, y = images.index_select(0, idx), labels.index_select(0, idx)
        if bf16_cast:
            x = x.to(torch.bfloat16)
        if args.inference:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_autocast):
                loss = F.cross_entropy(model(x).float(), y)
            losses.append(loss.item())
            times.append(time.perf_counter() - t0)
            continue
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_autocast):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, 0)
        opt.step()
        losses.append(loss.item())
        dt = time.perf_counter() - t0
        times.append(dt)
        if args.verbose:
            print(f"step {step + 1}/{args.steps} loss {losses[-1]:.4f} {dt:.3f} s", file=sys.stderr)

    timed = times[args.warmup:]
    st = statistics.median(timed)
    out = {
        "impl": "python_eager",
        "mode": "inference" if args.inference else "train_step",
        "precision": args.precision,
        "bf16_style": args.bf16_style if args.precision == "bf16" else None,
        "arch": args.arch,
        "depth": depth,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "malloc_tuned": _MALLOC_TUNED,
        "flush_denormal": args.flush_denormal,
        "step_time_s": st,
        "images_per_s": args.batch / st,
        "peak_rss_mb": peak_rss_mb(),
        "steps": args.steps,
        "timed_steps": len(timed),
        "final_loss": losses[-1],
        "torch": torch.__version__,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
