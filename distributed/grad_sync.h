// Data-parallel gradient sync for PEFT: only the trainable parameters take part, packed
// into flat buckets of about parallel.bucket_mb, averaged over the dp group (Megatron's
// bucketed gradient buffer, without the frozen backbone).
//
// Two ways to use it, every dp rank alike:
//   backward(); finish();                       pack, all-reduce, unpack after backward
//   prepare_for_backward(); backward(); finish();
//                                               each bucket's all-reduce starts from a
//                                               gradient hook as soon as its last gradient
//                                               of that backward arrives (call it before
//                                               the last micro-batch's backward only)
#pragma once

#include <torch/torch.h>

#include <memory>
#include <vector>

#include "distributed/process_group.h"

namespace shardtune {

class GradSync {
 public:
  // `params`: the trainable parameters (frozen ones are rejected: they must never be synced).
  GradSync(std::vector<torch::Tensor> params, std::shared_ptr<ProcessGroup> dp, double bucket_mb = 25.0);

  void prepare_for_backward();
  // Averages every parameter's .grad over the dp group (a parameter without a gradient
  // counts as zero and gets one). No-op when the dp group has one rank.
  void finish();

  // Payload of the dp all-reduce per step per rank: 0 when dp = 1.
  int64_t bytes_per_step() const;
  // Parameter indices (into the constructor's list) of each bucket.
  std::vector<std::vector<size_t>> bucket_members() const;

 private:
  struct Bucket {
    std::vector<size_t> members;   // parameter indices
    std::vector<int64_t> offsets;  // element offset of each member in `flat`
    torch::Tensor flat;            // [sum of numels], the params' dtype
    int pending = 0;               // gradients still to arrive this backward
    std::shared_ptr<Work> work;    // the running all-reduce, if started
  };
  void on_grad(size_t param, const torch::Tensor& grad);
  void launch(Bucket& b);

  std::vector<torch::Tensor> params_;
  std::shared_ptr<ProcessGroup> dp_;
  std::vector<Bucket> buckets_;
  std::vector<std::pair<size_t, size_t>> where_;  // param -> (bucket, member)
  bool armed_ = false;
};

}  // namespace shardtune
