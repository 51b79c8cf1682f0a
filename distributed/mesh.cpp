#include "distributed/mesh.h"

#include <mpi.h>

#include <stdexcept>

#include "distributed/mpi_process_group.h"

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

std::shared_ptr<ProcessGroup> split(int color, int key, const char* name) {
  MPI_Comm comm;
  if (MPI_Comm_split(MPI_COMM_WORLD, color, key, &comm) != MPI_SUCCESS)
    throw std::runtime_error(std::string("MPI_Comm_split for the ") + name + " group failed");
  return std::make_shared<MpiProcessGroup>(comm, name);
}

}  // namespace

Mesh make_mesh(const ParallelDims& dims) {
  Mesh m;
  m.dims = dims;
  MPI_Comm_rank(MPI_COMM_WORLD, &m.rank);
  int world = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  if (world != dims.world)
    throw std::invalid_argument("the mesh (" + dims.str() + ") was made for another world size than MPI's " +
                                std::to_string(world));
  const int r = m.rank, t = dims.tp_rank(r), d = dims.dp_rank(r), p = dims.pp_rank(r);
  MPI_Comm world_dup;
  MPI_Comm_dup(MPI_COMM_WORLD, &world_dup);
  m.world = std::make_shared<MpiProcessGroup>(world_dup, "world");
  m.tp = split(p * dims.dp + d, r, "tp");   // same pp and dp stage, consecutive ranks
  m.dp = split(p * dims.tp + t, r, "dp");   // same pp stage and tp slice
  m.pp = split(d * dims.tp + t, r, "pp");   // same dp replica and tp slice
  return m;
}

}  // namespace shardtune
