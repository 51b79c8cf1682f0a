// ProcessGroup over NCCL for CUDA tensors, with the group's MPI communicator for CPU ones
// (as torch.distributed's "cpu:gloo,cuda:nccl": the trainer's scalar reductions and the
// checkpoint's name exchanges stay CPU tensors on every backend).
//
// Bootstrap (llm.c's): rank 0 of the group calls ncclGetUniqueId, MPI_Bcast over the group's
// communicator shares it, every rank calls ncclCommInitRank (all ranks of the group
// collaborate). Each verb runs on the group's communication stream, ordered after LibTorch's
// current (compute) stream by a CUDA event; Work::wait() makes the compute stream wait for
// the verb's completion event (the host does not block: a later .item() or copy to the CPU
// does). A failed NCCL call, or an asynchronous error seen at wait(), aborts the
// communicator (ncclCommAbort) and throws with ncclGetErrorString's text.
//
// Point to point: NCCL matches sends and receives by order per peer and has no tags; the
// tag is ignored (callers must post matching pairs in the same order on both sides).
#pragma once

#include <mpi.h>

#include <functional>
#include <memory>

#include "distributed/mpi_process_group.h"
#include "distributed/nccl_api.h"
#include "distributed/process_group.h"

namespace shardtune {

// NCCL's dtype for `t` (ABI values of nccl.h), invalid_argument naming the dtype otherwise;
// bf16 needs NCCL >= 2.10 (`version` as ncclGetVersion gives it, 21000).
ncclDataType nccl_dtype(torch::ScalarType t, int version);
// NCCL's op for `op` on `t`. Avg: ncclAvg for floating dtypes on NCCL >= 2.10; otherwise
// ncclSum with *divide_after set (the group divides by its size after the sum, int64 with
// truncation, as MpiProcessGroup does).
ncclRedOp nccl_op(ReduceOp op, torch::ScalarType t, int version, bool* divide_after);

class NcclProcessGroup : public ProcessGroup {
 public:
  // Collective over `comm` (all its ranks call it). Takes ownership of `comm` (it serves the
  // bootstrap and CPU tensors). `device`: this rank's CUDA device; `compute_stream` returns
  // the stream LibTorch's ops run on (torch_device::current_stream).
  NcclProcessGroup(MPI_Comm comm, std::string name, int device, const NcclApi& nccl, const CudaApi& cuda,
                   std::function<void*()> compute_stream);
  ~NcclProcessGroup() override;
  NcclProcessGroup(const NcclProcessGroup&) = delete;
  NcclProcessGroup& operator=(const NcclProcessGroup&) = delete;

  int rank() const override { return cpu_->rank(); }
  int size() const override { return cpu_->size(); }
  std::string name() const override { return cpu_->name(); }
  int device() const { return device_; }

  std::shared_ptr<Work> allreduce(torch::Tensor& t, ReduceOp op) override;
  std::shared_ptr<Work> broadcast(torch::Tensor& t, int root) override;
  std::shared_ptr<Work> allgather(torch::Tensor& out, const torch::Tensor& in) override;
  std::shared_ptr<Work> reduce_scatter(torch::Tensor& out, const torch::Tensor& in, ReduceOp op) override;
  std::shared_ptr<Work> send(const torch::Tensor& t, int dst, int tag) override;
  std::shared_ptr<Work> recv(torch::Tensor& t, int src, int tag) override;
  void barrier() override;

  // ncclCommAbort: for a rank that fails while its peers may sit in a collective. Idempotent.
  void abort();

 private:
  // Runs `issue(stream)` on the communication stream after the compute stream's work so far;
  // `after` runs on the compute stream once the compute stream waits for it (wait()).
  std::shared_ptr<Work> enqueue(const std::string& what, std::vector<torch::Tensor> keep,
                                const std::function<ncclResult_t(cudaStream_t)>& issue,
                                std::function<void()> after = nullptr);
  void check(ncclResult_t r, const std::string& what);  // aborts the communicator on failure
  friend struct NcclWork;

  std::unique_ptr<MpiProcessGroup> cpu_;  // the group's MPI communicator: bootstrap, CPU tensors
  const NcclApi& nccl_;
  const CudaApi& cuda_;
  std::function<void*()> compute_stream_;
  int device_;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;  // the communication stream (non-blocking: no implicit sync with stream 0)
};

}  // namespace shardtune
