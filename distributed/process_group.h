// A communicator over a fixed set of ranks, modelled on c10d's Backend.
//
// Contract: every rank of the group calls the same collectives in the same order with
// tensors of the same shape and dtype (all processes of the group collaborate). Tensors
// are contiguous and live on the group's device. Verbs that return a Work start the
// operation and may return before it completes; the tensors must stay untouched until
// wait() returns. Supported dtypes: float32, float64, bfloat16, float16, int64 (and uint8
// bytes for broadcast, gather and point to point).
// bf16/fp16 reductions accumulate each pair in fp32 (never as raw bytes).
#pragma once

#include <torch/torch.h>

#include <memory>
#include <string>

namespace shardtune {

enum class ReduceOp { Sum, Avg, Max };

// A started operation. wait() blocks until it completes and is idempotent.
struct Work {
  virtual ~Work() = default;
  virtual void wait() = 0;
};

class ProcessGroup {
 public:
  virtual ~ProcessGroup() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string name() const = 0;  // "dp", "tp", ... for messages

  // In place: every rank ends with op over all ranks' `t`. Avg divides after summing
  // (integer division for int64).
  virtual std::shared_ptr<Work> allreduce(torch::Tensor& t, ReduceOp op = ReduceOp::Sum) = 0;
  // In place: every rank ends with root's `t`.
  virtual std::shared_ptr<Work> broadcast(torch::Tensor& t, int root) = 0;
  // out: [size * in.numel()] (any shape of that many elements), rank r's `in` at block r.
  virtual std::shared_ptr<Work> allgather(torch::Tensor& out, const torch::Tensor& in) = 0;
  // in: size blocks of out.numel(); rank r ends with op over all ranks' block r.
  virtual std::shared_ptr<Work> reduce_scatter(torch::Tensor& out, const torch::Tensor& in,
                                               ReduceOp op = ReduceOp::Sum) = 0;
  // Point to point; a send must meet a recv of the same shape, dtype and tag.
  virtual std::shared_ptr<Work> send(const torch::Tensor& t, int dst, int tag = 0) = 0;
  virtual std::shared_ptr<Work> recv(torch::Tensor& t, int src, int tag = 0) = 0;
  virtual void barrier() = 0;
};

}  // namespace shardtune
