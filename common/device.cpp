#include "common/device.h"

#include <cstdlib>
#include <stdexcept>

namespace shardtune {

EnvLookup process_env() {
  return [](const char* name) -> const char* { return std::getenv(name); };
}

namespace {

// A non-negative decimal integer, or invalid_argument naming the variable.
int env_index(const char* name, const char* value) {
  const std::string v = value;
  bool digits = !v.empty() && v.size() < 10;
  for (char c : v) digits = digits && c >= '0' && c <= '9';
  if (!digits)
    throw std::invalid_argument(std::string(name) + "=" + v + " is not a local rank (a non-negative integer)");
  return std::atoi(v.c_str());
}

}  // namespace

LocalRank local_rank_from(const EnvLookup& env, int shm_rank, int shm_size) {
  LocalRank l;
  l.size = shm_size;
  if (const char* v = env("OMPI_COMM_WORLD_LOCAL_RANK")) {
    l.rank = env_index("OMPI_COMM_WORLD_LOCAL_RANK", v);
    l.from = "OMPI_COMM_WORLD_LOCAL_RANK";
    // Open MPI's own count of the node's ranks, where it says.
    if (const char* s = env("OMPI_COMM_WORLD_LOCAL_SIZE")) l.size = env_index("OMPI_COMM_WORLD_LOCAL_SIZE", s);
  } else if (const char* v = env("SLURM_LOCALID")) {
    l.rank = env_index("SLURM_LOCALID", v);
    l.from = "SLURM_LOCALID";
  } else {
    l.rank = shm_rank;
    l.from = "MPI_Comm_split_type";
  }
  if (l.rank >= l.size)
    throw std::invalid_argument(l.from + "=" + std::to_string(l.rank) + " is not below the " + std::to_string(l.size) +
                                " rank(s) on this node");
  return l;
}

std::string DeviceChoice::str() const { return cuda() ? "cuda:" + std::to_string(index) : "cpu"; }

DeviceChoice choose_device(const std::string& requested, const DeviceFacts& facts, const LocalRank& local) {
  if (requested != "auto" && requested != "cpu" && requested != "cuda")
    throw std::invalid_argument("parallel.device=" + requested + " is not one of auto, cpu, cuda");
  if (requested == "cpu" || (requested == "auto" && (!facts.torch_has_cuda || facts.gpus == 0))) return {};
  if (!facts.torch_has_cuda)
    throw std::invalid_argument("parallel.device=cuda: this shardtune is built against a LibTorch without CUDA "
                                "(build against CUDA LibTorch, see scripts/gpu_check.sh, or set parallel.device=cpu)");
  if (facts.gpus == 0)
    throw std::invalid_argument("parallel.device=cuda: no GPU is visible to this process (CUDA_VISIBLE_DEVICES=" +
                                std::string(std::getenv("CUDA_VISIBLE_DEVICES") ? std::getenv("CUDA_VISIBLE_DEVICES") : "") +
                                "); set parallel.device=cpu");
  if (local.size > facts.gpus || local.rank >= facts.gpus)
    throw std::invalid_argument("parallel.device=" + requested + ": " + std::to_string(local.size) +
                                " ranks on this node but " + std::to_string(facts.gpus) +
                                " GPU(s): one GPU per rank (local rank " + std::to_string(local.rank) + " from " +
                                local.from + "); start at most " + std::to_string(facts.gpus) +
                                " ranks per node or set parallel.device=cpu");
  return {DeviceKind::Cuda, local.rank};
}

std::string backend_name(Backend b) { return b == Backend::Nccl ? "nccl" : "mpi"; }

Backend choose_backend(const std::string& requested, const DeviceChoice& device, int world_size,
                       const std::string& nccl_error) {
  if (requested != "auto" && requested != "mpi" && requested != "nccl")
    throw std::invalid_argument("parallel.backend=" + requested + " is not one of auto, mpi, nccl");
  if (requested == "nccl") {
    if (!nccl_error.empty())
      throw std::invalid_argument("parallel.backend=nccl: libnccl.so.2 cannot be loaded (" + nccl_error +
                                  "); put NCCL's lib/ on LD_LIBRARY_PATH or set parallel.backend=mpi");
    if (!device.cuda())
      throw std::invalid_argument("parallel.backend=nccl needs parallel.device=cuda (NCCL moves GPU memory); this rank "
                                  "runs on " + device.str());
    return Backend::Nccl;
  }
  if (requested == "mpi") {
    if (device.cuda() && world_size > 1)
      throw std::invalid_argument("parallel.backend=mpi with parallel.device=cuda and " + std::to_string(world_size) +
                                  " ranks: the MPI process group takes CPU tensors only; set parallel.backend=nccl "
                                  "(or auto)");
    return Backend::Mpi;
  }
  if (!device.cuda()) return Backend::Mpi;
  if (nccl_error.empty()) return Backend::Nccl;
  if (world_size == 1) return Backend::Mpi;  // nothing crosses a process
  throw std::invalid_argument("parallel.backend=auto on " + std::to_string(world_size) +
                              " GPU ranks needs NCCL, but libnccl.so.2 cannot be loaded (" + nccl_error +
                              "); put NCCL's lib/ on LD_LIBRARY_PATH");
}

std::optional<double> bf16_peak_flops(const std::string& name) {
  auto has = [&](const char* s) { return name.find(s) != std::string::npos; };
  if (has("H100") && has("PCIe")) return 756e12;
  if (has("H100") || has("H200")) return 989e12;
  if (has("A100")) return 312e12;
  return std::nullopt;
}

}  // namespace shardtune
