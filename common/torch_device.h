// What LibTorch knows about CUDA devices, behind one header with two implementations chosen
// by CMake (flashlight's way): torch_device_cuda.cpp where LibTorch has CUDA (it includes
// c10/cuda headers), torch_device_cpu.cpp otherwise (Debian's CPU LibTorch). Callers hold no
// #ifdef; on a CPU build every device function but built_with_cuda and gpu_count throws.
#pragma once

#include <cstdint>
#include <string>

namespace shardtune::torch_device {

bool built_with_cuda();          // this binary's LibTorch has CUDA
int gpu_count();                 // GPUs LibTorch sees (0 on a CPU build)
void set_device(int index);      // the calling thread's current CUDA device
void* current_stream(int index); // LibTorch's current cudaStream_t there: what its ops run on
std::string name(int index);     // cudaDeviceProp::name, e.g. "NVIDIA H200"
int64_t peak_allocated_bytes(int index);  // the caching allocator's peak since the last reset
void reset_peak(int index);

}  // namespace shardtune::torch_device
