#!/usr/bin/python3
"""Where one training step's oneDNN time goes: every primitive LibTorch ran through oneDNN
(GEMMs, batched attention GEMMs, GELU, reorders, the patch convolution) in one step, from
oneDNN's own verbose log, summed by primitive, kernel and shape, largest first.

  ONEDNN_VERBOSE=1 OMP_NUM_THREADS=2 build/shardtune train --model.arch vit_base_patch16_224 \\
      --model.num_classes 10 --peft.method lora --data.dataset synthetic --data.train_samples 64 \\
      --data.batch_size 8 --data.val_samples 8 --data.eval_samples 8 --train.steps 4 \\
      --train.precision bf16 --output.resume never --output.dir /tmp/vb > /tmp/vb.log
  bench/onednn_breakdown.py /tmp/vb.log [--step 3] [--top 20]

A step starts at its patch embedding (one per forward: the first oneDNN call of the run, a GEMM
of B * patches rows, or the convolution in builds before it became a GEMM), so step K lies
between the K-th and the (K+1)-th such line. Times are oneDNN's exec_time (ms); everything else
in the step (LibTorch's own kernels, autograd, the optimizer) is the step time minus the total.
"""
import argparse
import collections


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log")
    ap.add_argument("--step", type=int, default=3, help="1-based; the first step also creates the primitives")
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()
    lines = [l.rstrip("\n") for l in open(args.log) if l.startswith(("onednn_verbose,exec", "dnnl_verbose,exec"))]
    # The first oneDNN call of a run is its first forward's patch embedding (a GEMM since the
    # embedding became one, a convolution before): every call of that primitive and shape
    # starts a forward.
    if not lines:
        raise SystemExit(f"{args.log}: no oneDNN exec lines (run with ONEDNN_VERBOSE=1)")
    first = lines[0].split(",")
    starts = [i for i, l in enumerate(lines) if l.split(",")[3] == first[3] and l.split(",")[-2] == first[-2]]
    if len(starts) < args.step + 1:
        raise SystemExit(f"{args.log}: {len(starts)} forward passes logged, step {args.step} needs {args.step + 1}"
                         " (run more steps, with ONEDNN_VERBOSE=1)")
    window = lines[starts[args.step - 1]:starts[args.step]]
    total = collections.defaultdict(float)
    calls = collections.Counter()
    kinds = collections.defaultdict(float)
    for l in window:
        f = l.split(",")
        key = (f[3], f[4], f[-2])  # primitive, implementation, problem shape
        total[key] += float(f[-1])
        calls[key] += 1
        kinds[f[3]] += float(f[-1])
    print(f"| primitive | kernel | shape | calls | ms in step {args.step} |")
    print("|---|---|---|---|---|")
    for key, ms in sorted(total.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"| {key[0]} | {key[1]} | {key[2]} | {calls[key]} | {ms:.1f} |")
    print()
    print("by primitive: " + ", ".join(f"{k} {v:.0f} ms" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
          + f"; all oneDNN: {sum(kinds.values()):.0f} ms")


if __name__ == "__main__":
    main()
