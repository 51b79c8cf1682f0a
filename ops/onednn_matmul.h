// oneDNN's matmul primitive called directly on LibTorch's memory: a candidate kernel for the
// frozen GEMMs and the attention products (ops/cpu_ops.cpp).
//
// LibTorch 1.13 reaches oneDNN only through ops that convert layouts: its fp32 `mm` is
// OpenBLAS, and `mkldnn_linear_backward_input` (the `onednn` candidate) copies its operands
// into oneDNN tensors and back on every call. Debian's LibTorch links the shared oneDNN 2.6.3
// (libdnnl.so.2), whose headers are Debian's libdnnl-dev, so the same library can run a
// matmul straight on the tensors' plain (row-major or transposed) memory: no copy, and a
// primitive created once per shape. On the 2-core hosts of docs/BENCHMARKS.md it ran the
// ViT-B step's fp32 GEMMs 3-9% faster than OpenBLAS and attention's batched products 1.4-2x
// faster than LibTorch's bmm. The arithmetic is a GEMM with fp32 accumulation like the other
// candidates; only the summation order differs.
#pragma once

#include <torch/torch.h>

namespace shardtune::ops {

// True when this build has oneDNN's headers (libdnnl-dev) and can call it.
bool onednn_matmul_available();

// c = a @ b, with a [..., M, K] and b [..., K, N] of the same dtype (fp32 or bf16) and the
// same batch dims, on the CPU. Either operand may be a view whose last two dims are transposed
// (k^T, W^T: read in place, not copied). c: contiguous [..., M, N] of that dtype. Throws
// std::invalid_argument for anything else, and std::runtime_error where oneDNN refuses.
void onednn_matmul_out(const torch::Tensor& c, const torch::Tensor& a, const torch::Tensor& b);
torch::Tensor onednn_matmul(const torch::Tensor& a, const torch::Tensor& b);

}  // namespace shardtune::ops
