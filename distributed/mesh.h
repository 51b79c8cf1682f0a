// MPI start-up and the device mesh: the world group and its dp, tp and pp sub-groups.
#pragma once

#include <memory>
#include <string>

#include "common/device.h"
#include "distributed/parallel_dims.h"
#include "distributed/process_group.h"

namespace shardtune {

// MPI_Init_thread on construction (if not yet initialised), MPI_Finalize on destruction.
// Works without mpirun as a world of one.
class MpiRuntime {
 public:
  MpiRuntime(int* argc, char*** argv);
  ~MpiRuntime();
  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;
  int rank() const { return rank_; }
  int world_size() const { return world_; }

  // Ends every rank of the job now (MPI_Abort): for an error on one rank that the others
  // cannot know about. Never returns.
  [[noreturn]] static void abort_job(int code);

 private:
  bool owns_ = false;
  int rank_ = 0, world_ = 1;
};

// Every group this rank belongs to (all processes collaborate to build it).
struct Mesh {
  ParallelDims dims;
  int rank = 0;  // in the world
  std::shared_ptr<ProcessGroup> world, dp, tp, pp;
  DeviceChoice device;             // where this rank's tensors live (distributed/placement.h)
  Backend backend = Backend::Mpi;  // what the groups above run on
  int dp_rank() const { return dims.dp_rank(rank); }
  int tp_rank() const { return dims.tp_rank(rank); }
  int pp_rank() const { return dims.pp_rank(rank); }
};

// Splits MPI_COMM_WORLD into the dp, tp and pp groups of `dims` (MPI_Comm_split, key =
// world rank so group ranks follow the mesh order). All ranks of the world call it.
// With Backend::Nccl every group is an NcclProcessGroup on `device` (CPU tensors still take
// the group's MPI communicator); the groups are made in the same order on every rank.
Mesh make_mesh(const ParallelDims& dims, Backend backend = Backend::Mpi, DeviceChoice device = {});

}  // namespace shardtune
