#pragma once

// Element-wise and row kernels for the CPU step, written for AVX-512 (with its BF16
// conversions): softmax, LayerNorm, GELU, the bias and residual adds, each in one pass over bf16
// or fp32 memory with fp32 arithmetic. LibTorch 1.13's own bf16 kernels for these widen, compute
// and narrow in separate generic loops (LayerNorm even in separate casts); on the ViT-B step they
// cost ~10% (docs/BENCHMARKS.md). Its fp32 GELU calls libm's erff per element. ops::CpuOps calls
// these where `eligible` and its options allow, and LibTorch's op otherwise, so the results are
// the same function either way (to bf16 rounding, or a few fp32 ulps).
//
// Every tensor argument below is bf16 or fp32 (one dtype per call; weights, biases and LayerNorm
// statistics of any floating dtype, used in fp32).

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace shardtune::kernels {

// True when this CPU has AVX-512 F, BW, VL and BF16: the kernels can run.
bool available();
// Whether `t` may go through these kernels: bf16 or fp32, CPU, contiguous, on such a CPU.
bool eligible(const at::Tensor& t);

// y = softmax(scale * x) over the last dimension of a contiguous tensor (scale > 0: the
// attention scale applied on the fly), and its backward dx = scale * y * (dy - sum(y * dy)).
at::Tensor softmax_lastdim(const at::Tensor& x, double scale = 1.0);
at::Tensor softmax_lastdim_backward(const at::Tensor& y, const at::Tensor& dy, double scale = 1.0);

// LayerNorm over the last dimension of a contiguous x with weight and bias:
// statistics and arithmetic in fp32, output in x's dtype. Returns {y, mean, rstd} (mean and rstd
// fp32, one per row) for the backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm(const at::Tensor& x, const at::Tensor& weight,
                                                          const at::Tensor& bias, double eps);
// dx (x's dtype), and the weight and bias gradients (fp32) when asked for.
struct LayerNormGrads {
  at::Tensor dx, dweight, dbias;
};
LayerNormGrads layer_norm_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                   const at::Tensor& mean, const at::Tensor& rstd, bool want_dweight,
                                   bool want_dbias);

// The exact (erf) GELU, x Phi(x), of a contiguous tensor, and its backward
// dx = dy (Phi(x) + x phi(x)); fp32 arithmetic (erf by a rational fit, a few fp32 ulps).
at::Tensor gelu(const at::Tensor& x);
at::Tensor gelu_backward(const at::Tensor& dy, const at::Tensor& x);

// a + b (same shape, contiguous), rounded once: the residual adds.
at::Tensor add(const at::Tensor& a, const at::Tensor& b);

// y[..., j] += bias[j] in place (y contiguous, bias [n] of any floating dtype).
void add_bias_(const at::Tensor& y, const at::Tensor& bias);

}  // namespace shardtune::kernels
