// Pipeline parallelism: schedules as plain functions over stages, and one executor that
// runs a schedule's forward and backward passes, moving activations and their gradients
// between neighbouring stages over the pp group.
//
// A stage's behaviour follows from two facts about trainable parameters (see StageRole):
// a stage that precedes every trainable parameter runs its forward without autograd,
// stores nothing and never waits for a gradient.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "distributed/process_group.h"

namespace shardtune {

struct PipeOp {
  enum Kind { Forward, Backward };
  Kind kind;
  int microbatch;
  bool operator==(const PipeOp& o) const { return kind == o.kind && microbatch == o.microbatch; }
};

// The order in which `stage` (0-based, of `stages`) runs the forward and backward passes
// of `microbatches` micro-batches:
//   gpipe: every forward, then every backward (in the same order as 1f1b's backwards, so
//          both accumulate gradients in one order and give bit-identical results);
//   1f1b:  stages - 1 - stage warm-up forwards, then one forward and one backward
//          alternating, then the remaining backwards (at most stages - stage micro-batches'
//          activations alive at once instead of all of them).
// Throws std::invalid_argument for an unknown name ("parallel.schedule=...").
std::vector<PipeOp> pipeline_schedule(const std::string& name, int stage, int stages, int microbatches);

// The ideal bubble fraction of a synchronous schedule: (p - 1) / (m + p - 1).
double ideal_bubble(int stages, int microbatches);

struct StageRole {
  int stage = 0, stages = 1;
  bool backward = true;    // this stage or an earlier one holds a trainable parameter
  bool input_grad = false; // an earlier stage does: send it the gradient of our input
  // > 0: only the last `grad_tail` features of the activations carry a gradient (a side
  // stream beside a frozen backbone): only they are sent back and received.
  int64_t grad_tail = 0;
  bool first() const { return stage == 0; }
  bool last() const { return stage == stages - 1; }
};

struct StageHooks {
  std::function<torch::Tensor(int mb)> input;                           // first stage: micro-batch mb
  std::function<torch::Tensor(const torch::Tensor&)> forward;           // this stage's layers
  std::function<torch::Tensor(int mb, const torch::Tensor& out)> loss;  // last stage: scalar to backpropagate
  std::function<void()> before_last_backward;                           // e.g. arm the dp gradient buckets
};

struct PipelineTimes {
  double total_s = 0;  // the whole schedule on this stage
  double wait_s = 0;   // blocked receiving from a neighbour (the bubble, plus transfer time)
  double forward_bytes = 0, backward_bytes = 0;  // activations and gradients this stage sent (data only)
};

// Runs `ops` on this stage. `pp` is the pipeline group (rank = stage); may be null for one stage.
PipelineTimes run_pipeline(const std::vector<PipeOp>& ops, const StageRole& role, const StageHooks& hooks,
                           ProcessGroup* pp);

// Inference through the stages (no autograd): the first stage passes `input`, the last
// returns the output of its layers; other stages return an undefined tensor.
torch::Tensor pipeline_forward(const torch::Tensor& input, const StageRole& role,
                               const std::function<torch::Tensor(const torch::Tensor&)>& forward, ProcessGroup* pp);

// A tensor of any shape and dtype between two ranks: a fixed header, then the data.
std::vector<std::shared_ptr<Work>> send_tensor(ProcessGroup& g, const torch::Tensor& t, int dst,
                                               std::vector<torch::Tensor>& keep_alive);
torch::Tensor recv_tensor(ProcessGroup& g, int src);

}  // namespace shardtune
