// The operators of a ViT training step, behind one interface, so that the model (models/vit.cpp)
// says what it computes and an `Ops` object says how: which GEMM kernel a frozen weight takes,
// whether a softmax runs on ShardTune's AVX-512 kernels, and on which device. The model
// receives one `Ops` at construction and hands it to its layers; nothing here is process-wide
// state, so two models with different choices can live in one process (the A/B benchmarks do).
//
// Implementations:
//   TorchOps  LibTorch's own ops, any device: the reference, and the CUDA path.
//   CpuOps    the CPU step: frozen GEMMs and attention's products on the fastest exact kernel
//             for each shape (BLAS, oneDNN's inner product, oneDNN's matmul: ops/onednn_matmul.h),
//             chosen by measurement at the first call and cached per host (ops/tuner.h), and
//             the AVX-512 element-wise kernels (ops/cpu_kernels.h) where the CPU has them.
#pragma once

#include <torch/torch.h>

#include <memory>
#include <string>

#include <nlohmann/json.hpp>

namespace shardtune::ops {

// Queries (the first `queries` tokens, scaled), keys and values of multi-head attention.
struct QKV {
  torch::Tensor q, k, v;  // q [B, H, Q, hd]; k, v [B, H, N, hd]; each contiguous
};

class Ops {
 public:
  virtual ~Ops() = default;
  virtual std::string name() const = 0;

  // y = x W^T + b (weight [out, in], optional bias [out]) with autograd. Where W and b are
  // frozen no weight gradient is computed and only W is kept for the backward.
  virtual torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b) const = 0;
  // a @ b with autograd (the attention products q k^T and p v, any batch dims).
  virtual torch::Tensor matmul(const torch::Tensor& a, const torch::Tensor& b) const { return torch::matmul(a, b); }
  // LayerNorm over the last dim with weight and bias of any floating dtype; a reduced-precision
  // x is normalised in fp32 and returned in its own dtype.
  virtual torch::Tensor layer_norm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b,
                                   double eps) const;
  // The exact (erf) GELU.
  virtual torch::Tensor gelu(const torch::Tensor& x) const { return torch::gelu(x); }
  // x + a, the residual sums.
  virtual torch::Tensor residual_add(const torch::Tensor& x, const torch::Tensor& a) const { return x + a; }
  // qkv [B, N, 3 * H * hd] (rows q, k, v; heads contiguous inside each) -> QKV, q times q_scale.
  virtual QKV split_heads(const torch::Tensor& qkv, int64_t heads, int64_t queries, double q_scale) const;
  // True when scaled_softmax applies its scale for free for scores of this dtype, so the caller
  // need not scale q first.
  virtual bool softmax_takes_scale(torch::ScalarType) const { return false; }
  // softmax(scale * x) over the last dim.
  virtual torch::Tensor scaled_softmax(const torch::Tensor& x, double scale) const;

  // What this object chose, for summary.json ({} when there is no choice).
  virtual nlohmann::json report() const { return nlohmann::json::object(); }
  // Logs the choices made so far (once they are complete, e.g. after the first step).
  virtual void log_choices() const {}
};

// How CpuOps runs frozen GEMMs (train.frozen_gemm).
enum class FrozenGemm {
  Auto,    // per (dtype, direction, shape, threads) the fastest exact kernel, by measurement
  Blas,    // torch::linear, as a Python nn.Linear calls it
  OneDnn,  // fp32: oneDNN's inner product; bf16: one mm with the bias added in place
  OneDnnMatmul,  // oneDNN's matmul primitive on plain memory (ops/onednn_matmul.h), attention too
};
FrozenGemm parse_frozen_gemm(const std::string& name);  // invalid_argument naming train.frozen_gemm
std::string frozen_gemm_name(FrozenGemm g);

// Below this many multiply-adds a frozen GEMM stays on torch::linear: the per-call layout
// conversions of the other kernels cost more than they save.
constexpr int64_t kMinTunedMacs = int64_t{1} << 20;

struct CpuOptions {
  FrozenGemm frozen_gemm = FrozenGemm::Auto;
  bool bf16_kernels = true;  // the AVX-512 kernels where the CPU has them (train.bf16_kernels)
  // fp32 tensors take those kernels where auto timed them faster; with this, under the forced
  // paths too (tests, bench/step_ab.cpp).
  bool fp32_kernels = false;
  int64_t min_macs = kMinTunedMacs;
  // Where Auto keeps its measurements: "" = $XDG_CACHE_HOME/shardtune (~/.cache/shardtune
  // without it); "-" = no cache (measure every run).
  std::string cache_dir;
  int repetitions = 3;  // timed calls per candidate (after one untimed warm-up)
};

std::shared_ptr<const Ops> torch_ops();
std::shared_ptr<const Ops> make_cpu_ops(const CpuOptions& options);

// a @ b over leading batch dims (a [..., M, K], b [..., K, N], either a strided view) as one
// GEMM per batch entry, the entries spread over the threads, each GEMM on one thread; the
// backward the same way. LibTorch 1.13's CPU bmm runs the entries one after another, each
// GEMM split over the threads: ~2x slower on attention's 197 x 64 x 197 products (fp32). The
// per-entry GEMMs are the ones torch::matmul runs: identical values on this build (tested).
// `kernel` "onednn_matmul": the same through oneDNN's batched matmul (ops/onednn_matmul.h).
torch::Tensor batched_matmul(const torch::Tensor& a, const torch::Tensor& b, const std::string& kernel = "per_entry");
// What a model built without an explicit choice gets: CpuOps with oneDNN fixed (no measuring,
// so unit tests and tools are deterministic), the AVX-512 kernels where the CPU has them.
std::shared_ptr<const Ops> default_ops();

}  // namespace shardtune::ops
