#include "distributed/mesh.h"

#include <mpi.h>

#include <stdexcept>

#include "common/torch_device.h"
#include "distributed/mpi_process_group.h"
#include "distributed/nccl_process_group.h"

namespace shardtune {

MpiRuntime::MpiRuntime(int* argc, char*** argv) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) {
    int provided = 0;
    MPI_Init_thread(argc, argv, MPI_THREAD_SERIALIZED, &provided);
    owns_ = true;
  }
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &world_);
}

MpiRuntime::~MpiRuntime() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (owns_ && !finalized) MPI_Finalize();
}

void MpiRuntime::abort_job(int code) {
  MPI_Abort(MPI_COMM_WORLD, code);
  std::abort();  // MPI_Abort does not return; this satisfies [[noreturn]]
}

namespace {

// A group over `comm` (owned by it) on the mesh's backend (all ranks of `comm` call it).
std::shared_ptr<ProcessGroup> group(MPI_Comm comm, const char* name, Backend backend, const DeviceChoice& device) {
  if (backend == Backend::Mpi) return std::make_shared<MpiProcessGroup>(comm, name);
  std::string error;
  const NcclApi* nccl = nccl_api(&error);
  const CudaApi* cuda = nccl ? cuda_api(&error) : nullptr;
  if (!cuda) throw std::runtime_error(std::string("the ") + name + " group needs NCCL and the CUDA runtime: " + error);
  const int index = device.index;
  return std::make_shared<NcclProcessGroup>(comm, name, index, *nccl, *cuda,
                                            [index] { return torch_device::current_stream(index); });
}

std::shared_ptr<ProcessGroup> split(int color, int key, const char* name, Backend backend, const DeviceChoice& device) {
  MPI_Comm comm;
  if (MPI_Comm_split(MPI_COMM_WORLD, color, key, &comm) != MPI_SUCCESS)
    throw std::runtime_error(std::string("MPI_Comm_split for the ") + name + " group failed");
  return group(comm, name, backend, device);
}

}  // namespace

Mesh make_mesh(const ParallelDims& dims, Backend backend, DeviceChoice device) {
  if (backend == Backend::Nccl && !device.cuda())
    throw std::invalid_argument("make_mesh: the NCCL backend needs a CUDA device, got " + device.str());
  Mesh m;
  m.dims = dims;
  m.device = device;
  m.backend = backend;
  MPI_Comm_rank(MPI_COMM_WORLD, &m.rank);
  int world = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  if (world != dims.world)
    throw std::invalid_argument("the mesh (" + dims.str() + ") was made for another world size than MPI's " +
                                std::to_string(world));
  const int r = m.rank, t = dims.tp_rank(r), d = dims.dp_rank(r), p = dims.pp_rank(r);
  MPI_Comm world_dup;
  MPI_Comm_dup(MPI_COMM_WORLD, &world_dup);
  m.world = group(world_dup, "world", backend, device);
  m.tp = split(p * dims.dp + d, r, "tp", backend, device);   // same pp and dp stage, consecutive ranks
  m.dp = split(p * dims.tp + t, r, "dp", backend, device);   // same pp stage and tp slice
  m.pp = split(d * dims.tp + t, r, "pp", backend, device);   // same dp replica and tp slice
  return m;
}

}  // namespace shardtune
