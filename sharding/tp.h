// Tensor parallelism (Megatron's mapping), applied to a built model from the outside:
//   attn.qkv  column-parallel by heads: each rank holds whole heads' q, k and v rows
//   attn.proj row-parallel (the matching input columns), partial outputs summed
//   mlp.fc1   column-parallel, mlp.fc2 row-parallel
// Norms, the patch embedding, tokens and the head stay replicated. Biases stay whole (they
// are small; a column-parallel layer uses its rows of it). The f/g pair that makes the
// regions exact lives in tp.cpp and is all the communication tensor parallelism adds.
//
// Order (STYLE.md): build -> parallelize -> load -> inject PEFT -> freeze.
#pragma once

#include <memory>

#include "distributed/process_group.h"
#include "models/checkpoint.h"
#include "models/vit.h"

namespace shardtune {

// f and g over `group` (its ranks must run the same forward and backward in the same order).
std::shared_ptr<TensorParallel> make_tensor_parallel(std::shared_ptr<ProcessGroup> group);

// Shards every block of `model` over `tp` (size > 1). With `keep_values` the shards copy
// the current weights (a randomly initialised or already loaded model); without, they are
// left uninitialised for load_state. Returns the slices this rank holds, by parameter
// name, for sharded loading. Throws std::invalid_argument naming the config value when
// heads or mlp_dim do not divide by tp.
ShardMap parallelize(VisionTransformerImpl& model, std::shared_ptr<TensorParallel> tp, bool keep_values);

}  // namespace shardtune
