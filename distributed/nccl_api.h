// NCCL and the CUDA runtime, loaded at run time (dlopen) through a table of the few functions
// the NCCL process group uses, declared from their public C ABI (nccl.h of NCCL 2.x,
// cuda_runtime_api.h of CUDA 11/12), as vLLM's pynccl wrapper does. Why: neither library nor
// its headers can be installed on the CPU machines that build and test ShardTune, and a
// binary built against CUDA LibTorch already has both loaded (dlopen then returns that copy).
// Torch-free.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

namespace shardtune {

// --- the ABI (values fixed by nccl.h since NCCL 2.0; bf16 since 2.10, avg since 2.10) -------

using ncclResult_t = int;  // ncclSuccess = 0
// Opaque handles as void*: pointer-sized like the headers' struct pointers, and free of any
// clash with them in a CUDA build whose LibTorch headers declare the real ones.
using ncclComm_t = void*;
using cudaStream_t = void*;
using cudaEvent_t = void*;
using cudaError_t = int;  // cudaSuccess = 0

struct ncclUniqueId {
  char internal[128];  // NCCL_UNIQUE_ID_BYTES
};
static_assert(sizeof(ncclUniqueId) == 128, "ncclUniqueId is 128 bytes in nccl.h");

enum ncclDataType : int {
  ncclInt8 = 0, ncclUint8 = 1, ncclInt32 = 2, ncclUint32 = 3, ncclInt64 = 4, ncclUint64 = 5,
  ncclFloat16 = 6, ncclFloat32 = 7, ncclFloat64 = 8, ncclBfloat16 = 9,
};
enum ncclRedOp : int { ncclSum = 0, ncclProd = 1, ncclMax = 2, ncclMin = 3, ncclAvg = 4 };

constexpr unsigned kCudaStreamNonBlocking = 0x01;  // cudaStreamNonBlocking
constexpr unsigned kCudaEventDisableTiming = 0x02;  // cudaEventDisableTiming

// --- the tables -----------------------------------------------------------------------------

struct NcclApi {
  std::string path;  // what was opened
  int version = 0;   // ncclGetVersion: 21903 = 2.19.3
  ncclResult_t (*GetVersion)(int*) = nullptr;
  ncclResult_t (*GetUniqueId)(ncclUniqueId*) = nullptr;
  ncclResult_t (*CommInitRank)(ncclComm_t*, int nranks, ncclUniqueId id, int rank) = nullptr;  // id by value
  ncclResult_t (*AllReduce)(const void*, void*, size_t, ncclDataType, ncclRedOp, ncclComm_t, cudaStream_t) = nullptr;
  ncclResult_t (*Broadcast)(const void*, void*, size_t, ncclDataType, int root, ncclComm_t, cudaStream_t) = nullptr;
  ncclResult_t (*AllGather)(const void*, void*, size_t sendcount, ncclDataType, ncclComm_t, cudaStream_t) = nullptr;
  ncclResult_t (*ReduceScatter)(const void*, void*, size_t recvcount, ncclDataType, ncclRedOp, ncclComm_t,
                                cudaStream_t) = nullptr;
  ncclResult_t (*Send)(const void*, size_t, ncclDataType, int peer, ncclComm_t, cudaStream_t) = nullptr;
  ncclResult_t (*Recv)(void*, size_t, ncclDataType, int peer, ncclComm_t, cudaStream_t) = nullptr;
  ncclResult_t (*GroupStart)() = nullptr;
  ncclResult_t (*GroupEnd)() = nullptr;
  ncclResult_t (*CommGetAsyncError)(ncclComm_t, ncclResult_t*) = nullptr;
  ncclResult_t (*CommAbort)(ncclComm_t) = nullptr;
  ncclResult_t (*CommDestroy)(ncclComm_t) = nullptr;
  const char* (*GetErrorString)(ncclResult_t) = nullptr;

  // "what: <ncclGetErrorString>" as a std::runtime_error unless r is ncclSuccess.
  void check(ncclResult_t r, const std::string& what) const;
};

struct CudaApi {
  std::string path;
  cudaError_t (*GetDeviceCount)(int*) = nullptr;
  cudaError_t (*SetDevice)(int) = nullptr;
  cudaError_t (*GetDevice)(int*) = nullptr;
  cudaError_t (*StreamCreateWithFlags)(cudaStream_t*, unsigned) = nullptr;
  cudaError_t (*StreamDestroy)(cudaStream_t) = nullptr;
  cudaError_t (*StreamSynchronize)(cudaStream_t) = nullptr;
  cudaError_t (*StreamWaitEvent)(cudaStream_t, cudaEvent_t, unsigned) = nullptr;
  cudaError_t (*EventCreateWithFlags)(cudaEvent_t*, unsigned) = nullptr;
  cudaError_t (*EventRecord)(cudaEvent_t, cudaStream_t) = nullptr;
  cudaError_t (*EventSynchronize)(cudaEvent_t) = nullptr;
  cudaError_t (*EventDestroy)(cudaEvent_t) = nullptr;
  const char* (*GetErrorString)(cudaError_t) = nullptr;

  void check(cudaError_t r, const std::string& what) const;
};

// The names tried: $SHARDTUNE_NCCL_LIBRARY alone if set, else libnccl.so.2 (the soname CUDA
// LibTorch links, found on LD_LIBRARY_PATH and the loader's paths).
std::vector<std::string> nccl_library_names();
// libcudart.so.13, .so.12, .so.11.0, libcudart.so (one already loaded goes first).
std::vector<std::string> cudart_library_names();

// Opens the first of `names` that loads and resolves every symbol of the table. On failure
// returns nullptr with *error naming each library tried and why ("libnccl.so.2: cannot open
// shared object file ..." or "/x/libnccl.so.2: symbol ncclCommInitRank missing"). The
// library stays loaded for the life of the process.
std::unique_ptr<NcclApi> load_nccl(const std::vector<std::string>& names, std::string* error);
std::unique_ptr<CudaApi> load_cudart(const std::vector<std::string>& names, std::string* error);

// The process's tables, loaded once from the default names; nullptr with *error otherwise.
const NcclApi* nccl_api(std::string* error);
const CudaApi* cuda_api(std::string* error);

}  // namespace shardtune
