// What one rank of a dp x tp x pp mesh builds: its pipeline stage's part of the model, its
// tensor-parallel shards of it read straight from the (unsharded) checkpoint, and the PEFT
// method injected on top. The fixed order: build -> parallelize -> load -> inject -> freeze.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "distributed/mesh.h"
#include "models/checkpoint.h"
#include "models/vit.h"
#include "peft/method.h"
#include "sharding/pipeline.h"

namespace shardtune {

struct ModelSpec {
  ViTConfig model;
  std::string checkpoint;   // empty: random init (identical on every rank, from `seed`)
  bool load_head = true;    // false: a new task's head, freshly initialised
  PeftConfig peft;
  std::string adapter_dir;  // trained PEFT weights to load, if any
  uint64_t seed = 0;
  std::string precision = "fp32";  // bf16: frozen weights stored in bf16
  std::shared_ptr<const ops::Ops> ops = ops::default_ops();  // how the layers run (ops/ops.h)
};

struct StageModel {
  VisionTransformer model{nullptr};
  PeftState peft;
  StageRole role;
  ShardMap shards;                 // this rank's slices of sharded tensors
  size_t checkpoint_bytes = 0;     // bytes this rank copied out of the checkpoint
};

// All ranks of the mesh call it (the pp group exchanges which stages train).
StageModel build_stage_model(const ModelSpec& spec, const Mesh& mesh);

// Every stage's trainable tensors, full, by name, on world rank 0 (empty elsewhere).
// Tensor-parallel and data-parallel replicas hold the same values; the pp group of rank 0
// sends them. All ranks call it.
std::vector<std::pair<std::string, torch::Tensor>> gather_trainable(const StageModel& m, const Mesh& mesh);

// `mine` (this stage's named tensors, held identically by its dp and tp replicas) from every
// stage, on world rank 0 (empty elsewhere). All ranks call it.
std::vector<std::pair<std::string, torch::Tensor>> gather_named(
    const std::vector<std::pair<std::string, torch::Tensor>>& mine, const Mesh& mesh);

// The plain backbone (backbone_state: after merge_peft, the merged weights) whole and
// unsharded on world rank 0: tp shards all-gathered, stages sent over rank 0's pp group.
// All ranks call it.
std::vector<std::pair<std::string, torch::Tensor>> gather_backbone(const StageModel& m, const Mesh& mesh);

}  // namespace shardtune
