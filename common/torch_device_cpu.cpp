// torch_device.h for a LibTorch without CUDA: no device exists, asking for one is a bug
// (choose_device refuses parallel.device=cuda on such a build before anything gets here).
#include <stdexcept>

#include "common/torch_device.h"

namespace shardtune::torch_device {

namespace {
[[noreturn]] void no_cuda(const char* what) {
  throw std::logic_error(std::string("torch_device::") + what + ": this shardtune is built against a LibTorch without CUDA");
}
}  // namespace

bool built_with_cuda() { return false; }
int gpu_count() { return 0; }
void set_device(int) { no_cuda("set_device"); }
void* current_stream(int) { no_cuda("current_stream"); }
std::string name(int) { no_cuda("name"); }
int64_t peak_allocated_bytes(int) { no_cuda("peak_allocated_bytes"); }
void reset_peak(int) { no_cuda("reset_peak"); }

}  // namespace shardtune::torch_device
