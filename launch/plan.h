// `shardtune plan`: what a run costs per rank, before any process starts. Torch- and
// MPI-free arithmetic over the model's shape, the PEFT method and the mesh.
//
// Memory per rank (bytes):
//   frozen shard   this stage's blocks / tp (norms replicated) + embeddings on the first
//                  stage + norm and head on the last, in the frozen dtype
//   PEFT state     trainable params x (param + grad + 2 AdamW moments) x 4 bytes
//   activations    what autograd keeps per block per image for a frozen-backbone step,
//                  3 N D + (10 N D + N M + H N^2) / tp elements: the norm inputs and the
//                  LoRA input (replicated over TP), the contiguous copies of q, k, v that
//                  the batched matmuls save, softmax probabilities, the GELU input. The
//                  N D coefficient (13 in all) is fitted to ViT-B/16 runs at batch 8 and 16
//                  on this machine's LibTorch; ViT-L/16 validates it (docs/BENCHMARKS.md).
//                  x blocks of the stage x micro-batch images x micro-batches in flight
//                  (GPipe: m; 1F1B: min(p - stage, m))
//   workspace      the largest transient of one block's forward/backward (attention
//                  scores, MLP hidden and their gradients) for one micro-batch, plus the
//                  runtime's fixed cost (LibTorch, MPI, data): kRuntimeBytes
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "models/vit_config.h"
#include "peft/peft_config.h"

namespace shardtune {

struct PlanInput {
  ViTConfig model;
  PeftConfig peft;
  int world = 1;
  int tp = 0, pp = 0;           // 0: search the smallest tp x pp that fits
  int64_t global_batch = 64;
  int64_t microbatches = 1;
  std::string schedule = "1f1b";  // gpipe | 1f1b
  std::string precision = "fp32";
  double device_memory_bytes = 80e9;
};

struct PlanResult {
  int dp = 1, tp = 1, pp = 1;
  int64_t micro_batch = 1;          // images per micro-batch per rank
  double frozen_bytes = 0, peft_bytes = 0, activation_bytes = 0, workspace_bytes = 0;
  double total_bytes() const { return frozen_bytes + peft_bytes + activation_bytes + workspace_bytes; }
  double tp_allreduce_bytes = 0;    // per rank per step
  double pp_send_bytes = 0;         // per rank per step
  double dp_sync_bytes = 0;         // per rank per step
  double flops_per_step = 0;        // model FLOPs of the whole global batch
  double bubble = 0;                // (p-1)/(m+p-1)
  int64_t trainable_params = 0;
  bool fits = false;
};

// The figures for one mesh. Throws std::invalid_argument naming the offending value when
// the mesh does not fit the world or the model (the same checks as ParallelDims).
PlanResult plan_mesh(const PlanInput& in, int tp, int pp);

// With in.tp and in.pp set: that mesh. Otherwise the smallest tp x pp (tp first, up to
// 8, a node) that fits in.device_memory_bytes; `reasoning` gets a line per candidate.
PlanResult plan(const PlanInput& in, std::vector<std::string>* reasoning = nullptr);

// A human-readable report.
std::string format_plan(const PlanInput& in, const PlanResult& r);

// "80GB", "24GiB", "512MB", "1e9" -> bytes. Throws std::invalid_argument naming the text.
double parse_bytes(const std::string& text);

inline constexpr double kRuntimeBytes = 260e6;  // LibTorch + MPI + data, measured (docs/BENCHMARKS.md)

}  // namespace shardtune
