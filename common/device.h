// Where a rank computes and which transport its collectives take: the rules of
// parallel.device (auto | cpu | cuda) and parallel.backend (auto | mpi | nccl). Torch-free
// and MPI-free: every input is handed in, so each rule is a unit test (tests/test_device.cpp);
// distributed/placement.h gathers the inputs on a real rank.
//
// One GPU per rank: a rank's GPU is its local rank on the node. The local rank comes from
// the launcher (OMPI_COMM_WORLD_LOCAL_RANK, then SLURM_LOCALID) or, without one, from the
// rank's place in MPI's shared-memory split of the world.
#pragma once

#include <functional>
#include <optional>
#include <string>

namespace shardtune {

// --- the local rank -----------------------------------------------------------------------

struct LocalRank {
  int rank = 0;      // this rank's place on its node
  int size = 1;      // ranks on the node
  std::string from;  // "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID" or "MPI_Comm_split_type"
};

// getenv, or a table in tests: the value of a variable, nullptr when unset.
using EnvLookup = std::function<const char*(const char*)>;
EnvLookup process_env();

// `shm_rank` / `shm_size`: the rank and size of MPI_Comm_split_type(MPI_COMM_TYPE_SHARED).
// A launcher's variable wins; a value that is not a non-negative integer, or a local rank not
// below the node's rank count, is std::invalid_argument naming the variable and its value.
LocalRank local_rank_from(const EnvLookup& env, int shm_rank, int shm_size);

// --- the device ----------------------------------------------------------------------------

enum class DeviceKind { Cpu, Cuda };

struct DeviceFacts {
  bool torch_has_cuda = false;  // this binary's LibTorch was built with CUDA
  int gpus = 0;                 // GPUs this process sees (after CUDA_VISIBLE_DEVICES)
};

struct DeviceChoice {
  DeviceKind kind = DeviceKind::Cpu;
  int index = -1;  // the CUDA device (the local rank); -1 on CPU
  bool cuda() const { return kind == DeviceKind::Cuda; }
  std::string str() const;  // "cpu" | "cuda:N"
};

// parallel.device: cpu; cuda (an error naming parallel.device on a CPU LibTorch, without a
// visible GPU, or with more ranks on this node than it has GPUs); auto = cuda when LibTorch
// has CUDA and a GPU is visible, cpu otherwise (the same error when the GPUs are too few).
DeviceChoice choose_device(const std::string& requested, const DeviceFacts& facts, const LocalRank& local);

// --- the backend ---------------------------------------------------------------------------

enum class Backend { Mpi, Nccl };
std::string backend_name(Backend b);  // "mpi" | "nccl"

// parallel.backend. `nccl_error`: why libnccl.so.2 did not load, empty when it did.
// mpi: MPI collectives on CPU tensors (on cuda only a world of one, which needs none);
// nccl: needs the library and parallel.device=cuda; auto: nccl on cuda (a world of one
// without the library falls back to mpi), mpi on cpu. Errors name parallel.backend.
Backend choose_backend(const std::string& requested, const DeviceChoice& device, int world_size,
                       const std::string& nccl_error);

// --- figures -------------------------------------------------------------------------------

// Dense bf16 peak FLOP/s of a GPU from its name (cudaDeviceProp::name), as torchtitan's MFU
// uses: H100/H200 SXM 989e12, H100 PCIe 756e12, A100 312e12; nullopt for any other.
std::optional<double> bf16_peak_flops(const std::string& device_name);

}  // namespace shardtune
