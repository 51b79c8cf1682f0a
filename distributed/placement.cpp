#include "distributed/placement.h"

#include <mpi.h>
#include <spdlog/spdlog.h>

#include <stdexcept>

#include "common/torch_device.h"
#include "distributed/nccl_api.h"

namespace shardtune {

namespace {

Placement decide(const std::string& device, const std::string& backend, const Topology& topo, int world) {
  Placement p;
  p.local = local_rank_from(process_env(), topo.shared_local_rank, topo.local_size);
  DeviceFacts facts;
  facts.torch_has_cuda = torch_device::built_with_cuda();
  facts.gpus = facts.torch_has_cuda ? torch_device::gpu_count() : 0;
  p.device = choose_device(device, facts, p.local);
  std::string nccl_error;
  const NcclApi* nccl = nullptr;
  // NCCL is only looked for where it could be used: a CPU run never touches the library.
  if (backend == "nccl" || (backend == "auto" && p.device.cuda())) nccl = nccl_api(&nccl_error);
  p.backend = choose_backend(backend, p.device, world, nccl ? "" : nccl_error);
  if (p.backend == Backend::Nccl) {
    std::string cuda_error;
    if (!cuda_api(&cuda_error))
      throw std::invalid_argument("parallel.backend=" + backend + ": the CUDA runtime cannot be loaded (" + cuda_error + ")");
    p.nccl = nccl->path + " " + std::to_string(nccl->version);
  }
  return p;
}

}  // namespace

Placement place_rank(const std::string& device, const std::string& backend, const Topology& topo) {
  int world = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  Placement p;
  std::string error;
  try {
    p = decide(device, backend, topo, world);
  } catch (const std::invalid_argument& e) {
    error = e.what();
  }
  // [first failing rank, backend, device kind] and their negatives: one MIN gives min and max.
  const int failed = error.empty() ? world : topo.rank;
  const int b = static_cast<int>(p.backend), k = static_cast<int>(p.device.kind);
  int mine[5] = {failed, b, -b, k, -k}, all[5];
  if (MPI_Allreduce(mine, all, 5, MPI_INT, MPI_MIN, MPI_COMM_WORLD) != MPI_SUCCESS)
    throw std::runtime_error("placement: MPI_Allreduce failed");
  if (!error.empty()) throw std::invalid_argument(error);
  if (all[0] < world)
    throw std::invalid_argument("rank " + std::to_string(all[0]) + " rejected parallel.device=" + device +
                                " / parallel.backend=" + backend + " (its message says why)");
  if (all[1] != -all[2])
    throw std::invalid_argument("parallel.backend=" + backend + " chose nccl on some ranks and mpi on others "
                                "(libnccl.so.2 loads on some nodes only?); set parallel.backend explicitly");
  if (all[3] != -all[4])
    throw std::invalid_argument("parallel.device=" + device + " chose cuda on some ranks and cpu on others; set "
                                "parallel.device explicitly");
  if (p.device.cuda()) torch_device::set_device(p.device.index);
  if (topo.rank == 0)
    spdlog::info("placement: device {} (local rank {} from {}), backend {}{}", p.device.str(), p.local.rank,
                 p.local.from, backend_name(p.backend), p.nccl.empty() ? "" : " (" + p.nccl + ")");
  return p;
}

}  // namespace shardtune
