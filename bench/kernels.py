#!/usr/bin/python3
"""Per-kernel microbenchmarks behind ShardTune's CPU step choices (docs/BENCHMARKS.md), through
Debian's python3-torch (the same libtorch_cpu.so.1.13 as build/shardtune):

- fp32 GEMMs of the ViT-B/16 step's shapes (batch 8: 1576 tokens) as LibTorch's BLAS runs them
  (`torch.addmm` forward, `torch.mm` input gradient) against oneDNN's inner-product
  backward-data kernel (`mkldnn_linear_backward_input`), which models/vit.cpp uses for frozen
  weights (`train.frozen_gemm=onednn`), including the per-call conversions it pays;
- LayerNorm of a [8, 197, 768] bf16 activation: the bf16 kernel against cast to fp32 + fp32
  kernel + cast back (what LayerNormOp does for bf16).

  /usr/bin/python3 bench/kernels.py [--threads 2] [--repeats 10]

Prints a markdown table; times are the best of --repeats (a busy core only slows a run).
"""
import argparse
import time

import torch


def best_ms(f, repeats):
    f()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    r = args.repeats
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, oneDNN {torch.backends.mkldnn.is_available()}")
    print("| GEMM [M x K] x [K x N] | BLAS forward (addmm) | oneDNN forward | BLAS input grad (mm) | oneDNN input grad |")
    print("|---|---|---|---|---|")
    for m, k, n in [(1576, 768, 2304), (1576, 768, 768), (1576, 768, 3072), (1576, 3072, 768)]:
        x, w, b, dy = torch.randn(m, k), torch.randn(n, k), torch.randn(n), torch.randn(m, n)
        gf = 2 * m * k * n / 1e6  # GFLOP per ms = TFLOP/s; * 1e3 -> GFLOP/s below
        bwd_in = torch.ops.aten.mkldnn_linear_backward_input
        t = [
            best_ms(lambda: torch.addmm(b, x, w.t()), r),
            best_ms(lambda: bwd_in([m, n], x.to_mkldnn(), w.t().contiguous()).to_dense().add_(b), r),
            best_ms(lambda: torch.mm(dy, w), r),
            best_ms(lambda: bwd_in([m, k], dy.to_mkldnn(), w).to_dense(), r),
        ]
        print(f"| {m} x {k} x {n} | " + " | ".join(f"{gf / v:.0f} GFLOP/s" for v in t) + " |")
    bf = torch.bfloat16
    x = torch.randn(8, 197, 768).to(bf)
    wb, bb = torch.ones(768, dtype=bf), torch.zeros(768, dtype=bf)
    wf, bf32 = torch.ones(768), torch.zeros(768)
    t_bf16 = best_ms(lambda: torch.layer_norm(x, [768], wb, bb, 1e-6), r)
    t_fp32 = best_ms(lambda: torch.layer_norm(x.float(), [768], wf, bf32, 1e-6).to(bf), r)
    print()
    print("| LayerNorm [8, 197, 768] bf16 | time |")
    print("|---|---|")
    print(f"| bf16 kernel | {t_bf16:.2f} ms |")
    print(f"| cast to fp32, fp32 kernel, cast back | {t_fp32:.2f} ms |")


if __name__ == "__main__":
    main()
