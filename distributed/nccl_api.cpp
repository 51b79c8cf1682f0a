#include "distributed/nccl_api.h"

#include <dlfcn.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <stdexcept>

namespace shardtune {

void NcclApi::check(ncclResult_t r, const std::string& what) const {
  if (r == 0) return;
  throw std::runtime_error(what + ": NCCL error " + std::to_string(r) + " (" +
                           (GetErrorString ? GetErrorString(r) : "no ncclGetErrorString") + ")");
}

void CudaApi::check(cudaError_t r, const std::string& what) const {
  if (r == 0) return;
  throw std::runtime_error(what + ": CUDA error " + std::to_string(r) + " (" +
                           (GetErrorString ? GetErrorString(r) : "no cudaGetErrorString") + ")");
}

std::vector<std::string> nccl_library_names() {
  if (const char* p = std::getenv("SHARDTUNE_NCCL_LIBRARY"); p && *p) return {p};  // the user's choice, alone
  return {"libnccl.so.2"};
}

std::vector<std::string> cudart_library_names() {
  return {"libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so"};
}

namespace {

// Resolves `symbol` into `fn`; false with *missing = symbol when the library lacks it.
template <typename F>
bool bind(void* lib, const char* symbol, F& fn, std::string* missing) {
  void* p = dlsym(lib, symbol);
  if (!p) {
    *missing = symbol;
    return false;
  }
  fn = reinterpret_cast<F>(p);
  return true;
}

// Tries each name; `resolve(lib, api, &missing)` binds the table. Libraries that load but
// lack a symbol are closed again. A name already loaded in the process (CUDA LibTorch's own
// libcudart / libnccl) wins over the order of the list: one runtime, not two.
template <typename Api, typename Resolve>
std::unique_ptr<Api> load_first(std::vector<std::string> names, Resolve resolve, std::string* error) {
  for (size_t i = 0; i < names.size(); ++i)
    if (void* lib = dlopen(names[i].c_str(), RTLD_NOW | RTLD_NOLOAD)) {
      dlclose(lib);  // drops the reference NOLOAD took; the loop below opens it again
      std::rotate(names.begin(), names.begin() + static_cast<std::ptrdiff_t>(i), names.begin() + static_cast<std::ptrdiff_t>(i) + 1);
      break;
    }
  std::string why;
  for (const auto& name : names) {
    dlerror();
    void* lib = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
      const char* e = dlerror();
      why += (why.empty() ? "" : "; ") + (e ? std::string(e) : name + ": cannot be opened");
      continue;
    }
    auto api = std::make_unique<Api>();
    api->path = name;
    std::string missing;
    if (!resolve(lib, *api, &missing)) {
      why += (why.empty() ? "" : "; ") + name + ": symbol " + missing + " missing";
      dlclose(lib);
      continue;
    }
    return api;  // `lib` stays open: the table points into it
  }
  if (error) *error = why.empty() ? "no library names to try" : why;
  return nullptr;
}

}  // namespace

std::unique_ptr<NcclApi> load_nccl(const std::vector<std::string>& names, std::string* error) {
  auto resolve = [](void* lib, NcclApi& a, std::string* m) {
    return bind(lib, "ncclGetVersion", a.GetVersion, m) && bind(lib, "ncclGetErrorString", a.GetErrorString, m) &&
           bind(lib, "ncclGetUniqueId", a.GetUniqueId, m) && bind(lib, "ncclCommInitRank", a.CommInitRank, m) &&
           bind(lib, "ncclAllReduce", a.AllReduce, m) && bind(lib, "ncclBroadcast", a.Broadcast, m) &&
           bind(lib, "ncclAllGather", a.AllGather, m) && bind(lib, "ncclReduceScatter", a.ReduceScatter, m) &&
           bind(lib, "ncclSend", a.Send, m) && bind(lib, "ncclRecv", a.Recv, m) &&
           bind(lib, "ncclGroupStart", a.GroupStart, m) && bind(lib, "ncclGroupEnd", a.GroupEnd, m) &&
           bind(lib, "ncclCommGetAsyncError", a.CommGetAsyncError, m) && bind(lib, "ncclCommAbort", a.CommAbort, m) &&
           bind(lib, "ncclCommDestroy", a.CommDestroy, m);
  };
  auto api = load_first<NcclApi>(names, resolve, error);
  if (api && api->GetVersion(&api->version) != 0) api->version = 0;
  return api;
}

std::unique_ptr<CudaApi> load_cudart(const std::vector<std::string>& names, std::string* error) {
  auto resolve = [](void* lib, CudaApi& a, std::string* m) {
    return bind(lib, "cudaGetDeviceCount", a.GetDeviceCount, m) && bind(lib, "cudaSetDevice", a.SetDevice, m) &&
           bind(lib, "cudaGetDevice", a.GetDevice, m) &&
           bind(lib, "cudaStreamCreateWithFlags", a.StreamCreateWithFlags, m) &&
           bind(lib, "cudaStreamDestroy", a.StreamDestroy, m) &&
           bind(lib, "cudaStreamSynchronize", a.StreamSynchronize, m) &&
           bind(lib, "cudaStreamWaitEvent", a.StreamWaitEvent, m) &&
           bind(lib, "cudaEventCreateWithFlags", a.EventCreateWithFlags, m) &&
           bind(lib, "cudaEventRecord", a.EventRecord, m) && bind(lib, "cudaEventSynchronize", a.EventSynchronize, m) &&
           bind(lib, "cudaEventDestroy", a.EventDestroy, m) && bind(lib, "cudaGetErrorString", a.GetErrorString, m);
  };
  return load_first<CudaApi>(names, resolve, error);
}

namespace {
template <typename Api, typename Load>
const Api* once(Load load, std::vector<std::string> (*names)(), std::string* error) {
  static std::once_flag flag;
  static std::unique_ptr<Api> api;
  static std::string why;
  std::call_once(flag, [&] { api = load(names(), &why); });
  if (!api && error) *error = why;
  return api.get();
}
}  // namespace

const NcclApi* nccl_api(std::string* error) { return once<NcclApi>(load_nccl, nccl_library_names, error); }
const CudaApi* cuda_api(std::string* error) { return once<CudaApi>(load_cudart, cudart_library_names, error); }

}  // namespace shardtune
