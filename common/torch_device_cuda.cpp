// torch_device.h for a LibTorch with CUDA. Only c10/ATen CUDA calls that have kept their
// form through PyTorch 1.13-2.x; the allocator's stat index 0 is StatType::AGGREGATE in all
// of them (the enum moved namespaces in 2.5, the index did not).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include "common/torch_device.h"

namespace shardtune::torch_device {

namespace {
c10::DeviceIndex dev(int index) { return static_cast<c10::DeviceIndex>(index); }
}  // namespace

bool built_with_cuda() { return true; }
int gpu_count() { return static_cast<int>(c10::cuda::device_count()); }
void set_device(int index) { c10::cuda::set_device(dev(index)); }
void* current_stream(int index) { return static_cast<void*>(c10::cuda::getCurrentCUDAStream(dev(index)).stream()); }
std::string name(int index) { return at::cuda::getDeviceProperties(dev(index))->name; }
int64_t peak_allocated_bytes(int index) {
  return c10::cuda::CUDACachingAllocator::getDeviceStats(dev(index)).allocated_bytes[0].peak;
}
void reset_peak(int index) { c10::cuda::CUDACachingAllocator::resetPeakStats(dev(index)); }

}  // namespace shardtune::torch_device
