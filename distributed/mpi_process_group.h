// ProcessGroup over an MPI communicator, for CPU tensors (Open MPI).
#pragma once

#include <mpi.h>

#include "distributed/process_group.h"

namespace shardtune {

class MpiProcessGroup : public ProcessGroup {
 public:
  // Takes ownership of `comm` (freed on destruction unless it is MPI_COMM_WORLD).
  MpiProcessGroup(MPI_Comm comm, std::string name);
  ~MpiProcessGroup() override;
  MpiProcessGroup(const MpiProcessGroup&) = delete;
  MpiProcessGroup& operator=(const MpiProcessGroup&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return name_; }
  MPI_Comm comm() const { return comm_; }

  std::shared_ptr<Work> allreduce(torch::Tensor& t, ReduceOp op) override;
  std::shared_ptr<Work> broadcast(torch::Tensor& t, int root) override;
  std::shared_ptr<Work> allgather(torch::Tensor& out, const torch::Tensor& in) override;
  std::shared_ptr<Work> reduce_scatter(torch::Tensor& out, const torch::Tensor& in, ReduceOp op) override;
  std::shared_ptr<Work> send(const torch::Tensor& t, int dst, int tag) override;
  std::shared_ptr<Work> recv(torch::Tensor& t, int src, int tag) override;
  void barrier() override;

 private:
  MPI_Comm comm_;
  std::string name_;
  int rank_ = 0, size_ = 1;
};

}  // namespace shardtune
