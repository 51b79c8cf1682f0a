// The training loop: `shardtune train` and `shardtune eval`.
//
// The loop runs on a Mesh (dp x tp x pp): each rank builds its stage's shard of the model
// (sharding/stage_model.h); a step runs the pipeline schedule over the micro-batches of the
// dp rank's slice of the global batch (one stage: forward and backward per micro-batch);
// tensor-parallel regions sum their partial results inside the layers; PEFT gradients are
// averaged over dp in buckets; every rank steps AdamW on its stage's parameters; rank 0
// gathers the adapter and writes the outputs.
#pragma once

#include <memory>
#include <string>

#include "distributed/mesh.h"
#include "models/vit_config.h"
#include "peft/peft_config.h"
#include "trainer/data.h"

namespace shardtune {

namespace ops {
class Ops;
}

struct TrainConfig {
  int64_t steps = 100;          // total optimizer steps (ignored when epochs > 0)
  int64_t epochs = 0;           // > 0: steps = ceil(epochs * train size / batch)
  double lr = 1e-3;
  double weight_decay = 0.0;
  double beta1 = 0.9, beta2 = 0.999;
  int64_t warmup_steps = 0;     // linear warm-up, then cosine decay to 0
  double grad_clip = 1.0;       // global-norm clipping; 0 = off
  double label_smoothing = 0.0;
  std::string precision = "fp32";
  uint64_t seed = 0;            // PEFT initialisation (and dropout)
  int64_t eval_every = 0;       // 0: only at the end
  int64_t log_every = 10;
  int64_t exit_interval = 0;    // > 0: stop after this many steps of this run, with a checkpoint
  int64_t profile_step = 0;     // > 0: record LibTorch's op profile of this step (1-based) to
                                // output.dir/profile_step_N_rankR.json (chrome://tracing)
  std::string frozen_gemm = "auto";  // auto | blas | onednn | onednn_matmul (ops/ops.h)
  bool bf16_kernels = true;          // ShardTune's AVX-512 bf16 kernels where the CPU has them
  std::string kernel_cache;          // where auto keeps its measurements; "" default, "-" none
  bool cache_backbone = false;       // keep each training image's frozen-backbone output (trainer/backbone_cache.h)
  double cache_max_gb = 8.0;         // the cache's memory bound per rank
};

struct OutputConfig {
  std::string dir = "runs/default";
  int64_t checkpoint_every = 0;  // 0: only at exit_interval / signal stops
  int64_t keep = 2;              // newest checkpoints kept
  std::string resume = "auto";   // auto | never | PATH of a checkpoints/step_N directory
};

struct RunSpec {
  ViTConfig model;
  std::string checkpoint;   // backbone to start from; empty: random init (pretraining)
  bool load_head = true;    // false: the checkpoint's head is skipped (a new task's head)
  PeftConfig peft;
  DataConfig data;
  TrainConfig train;
  OutputConfig output;
  double bucket_mb = 25.0;
  int64_t microbatches = 1;  // the local batch runs as this many chunks, gradients accumulated
  std::string schedule = "1f1b";  // pipeline schedule: gpipe | 1f1b
};

// The operators a model of this run uses (ops/ops.h): CpuOps with the run's kernel choices,
// LibTorch's own ops on a GPU.
std::shared_ptr<const ops::Ops> ops_for(const TrainConfig& train, bool cuda);

// Trains on `mesh` (all ranks call it). Returns the final eval top-1.
double train(const RunSpec& spec, const Mesh& mesh);

// Evaluates backbone + adapter on the test split (all ranks call it); writes
// output.dir/eval.json on rank 0. Returns top-1.
double evaluate_adapter(const RunSpec& spec, const std::string& adapter_dir, const Mesh& mesh);

}  // namespace shardtune
