// CpuOps: the CPU step's operators. What it chooses, and why:
//
// Frozen GEMMs (a weight with requires_grad false: the backbone under PEFT). Candidates, all
// exact (the same products, fp32 accumulation; they differ only in summation order):
//   blas    at::mm: OpenBLAS sgemm for fp32; for bf16 oneDNN's GEMM where the CPU has AVX-512
//           BF16, LibTorch's reference loop elsewhere (100x slower: 3.9 s against 43 ms for a
//           ViT-B qkv GEMM on an AVX2-only host)
//   onednn  oneDNN's inner-product backward-data kernel (grad_input = grad_output @ weight,
//           weight read in plain layout): y = x W^T as mkldnn_linear_backward_input with W^T
//           copied contiguous per call, dx = dy W directly; 1.0-1.9x BLAS on one host, slower
//           on another (docs/BENCHMARKS.md)
//   fp32    bf16 only: both operands widened to fp32, at::mm, the product rounded to bf16: the
//           same arithmetic as a bf16 GEMM with fp32 accumulation
//   onednn_matmul  oneDNN's matmul primitive on the tensors' own memory (W^T read in place, no
//           conversion, one primitive per shape; ops/onednn_matmul.h), where the build has
//           oneDNN's headers
// Either way no weight gradient is computed and only W is kept for the backward (torch::linear's
// node would also keep x), and the bias goes into y in place. frozen_gemm=auto times the
// candidates for each (dtype, direction, M, K, N, threads) at its first call (ops/tuner.h);
// blas and onednn force the paths of earlier releases (blas: torch::linear, as a Python
// nn.Linear; onednn: the inner product for fp32, one mm for bf16).
//
// bf16 GEMMs of trainable weights and the attention products: auto also compares LibTorch's
// bf16 op with its fp32 twin (widen, compute, round), through autograd. The attention products
// also take per-entry GEMMs (fp32) and oneDNN's batched matmul (both dtypes) as candidates.
// frozen_gemm=onednn_matmul forces oneDNN's matmul for the frozen GEMMs and attention.
//
// The AVX-512 kernels (ops/cpu_kernels.h) replace LibTorch's softmax, LayerNorm, GELU, bias and
// residual adds where the CPU has AVX-512 BF16 and train.bf16_kernels is on: for bf16 always
// (auto also times each against LibTorch's op per shape), for fp32 where auto timed them
// faster (the forced paths keep LibTorch's fp32 ops, as earlier releases did). The bias and
// residual adds are bit-identical either way; the others agree to a few fp32 ulps.
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <spdlog/spdlog.h>
#include <torch/csrc/autograd/custom_function.h>

#include <functional>
#include <sstream>

#include "ops/cpu_kernels.h"
#include "ops/onednn_matmul.h"
#include "ops/ops.h"
#include "ops/tuner.h"

namespace shardtune::ops {

namespace {

constexpr int64_t kProbeRows = 256;

std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  auto out = sizes.vec();
  out.back() = last;
  return out;
}

const char* dtype_name(torch::ScalarType t) {
  switch (t) {
    case torch::kFloat: return "fp32";
    case torch::kBFloat16: return "bf16";
    case torch::kHalf: return "fp16";
    default: return "other";
  }
}

std::string shape_key(at::IntArrayRef s) {
  std::ostringstream o;
  for (size_t i = 0; i < s.size(); ++i) o << (i ? "x" : "") << s[i];
  return o.str();
}

// C = a @ op(w) (op(w) = w^T when `transpose`, w [n, k] then; else w [k, n]) by `kernel`, as a
// fresh dense tensor of `shape` (not a view: the bias goes into it in place, which autograd
// forbids on a view made inside a custom function).
torch::Tensor gemm(const std::string& kernel, const torch::Tensor& a, const torch::Tensor& w, bool transpose,
                   at::IntArrayRef shape) {
  const torch::Tensor b = transpose ? w.t() : w;  // [k, n]
  if (kernel == "onednn") {
    // grad_input [M, in] = grad_output [M, out] @ weight [out, in]: here weight = b, plain.
    torch::Tensor y = at::mkldnn_linear_backward_input({a.size(0), b.size(1)}, a.contiguous().to_mkldnn(), b.contiguous());
    return y.reshape(shape).to_dense();
  }
  if (kernel == "onednn_matmul") {
    torch::Tensor y = torch::empty(shape, a.options());
    onednn_matmul_out(y.view({-1, b.size(1)}), a, b);
    return y;
  }
  if (kernel == "fp32") {
    torch::Tensor y = torch::empty(shape, a.options().dtype(torch::kFloat));
    torch::Tensor y2d = y.view({-1, b.size(1)});
    torch::mm_out(y2d, a.to(torch::kFloat), b.to(torch::kFloat));
    return y.to(a.scalar_type());
  }
  torch::Tensor y = torch::empty(shape, a.options());  // "blas"
  torch::Tensor y2d = y.view({-1, b.size(1)});
  torch::mm_out(y2d, a, b);
  return y;
}

class CpuOps;

// y = x W^T (+ b) with W and b frozen; backward dx = dy W, each by its chosen kernel.
struct FrozenMatmul : torch::autograd::Function<FrozenMatmul> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& w,
                               const c10::optional<torch::Tensor>& b, const std::string& fwd, const std::string& bwd,
                               bool kernel_bias) {
    ctx->save_for_backward({w});
    ctx->saved_data["bwd"] = bwd;
    torch::Tensor y = gemm(fwd, x.reshape({-1, x.size(-1)}), w, /*transpose=*/true, with_last(x.sizes(), w.size(0)));
    if (!b || !b->defined()) return y;
    if (kernel_bias && kernels::eligible(y)) {
      kernels::add_bias_(y, *b);  // a quarter of LibTorch's add_ time (bench/kernels_ab.cpp)
      return y;
    }
    return y.add_(*b);
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const torch::Tensor w = ctx->get_saved_variables()[0];
    const torch::Tensor& dy = grads[0];
    torch::Tensor dx;
    if (ctx->needs_input_grad(0))
      dx = gemm(ctx->saved_data["bwd"].toStringRef(), dy.reshape({-1, dy.size(-1)}), w, /*transpose=*/false,
                with_last(dy.sizes(), w.size(1)));
    return {dx, torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

// The AVX-512 kernels as autograd functions (inputs saved as LibTorch saves them).
struct LayerNormAvx512 : torch::autograd::Function<LayerNormAvx512> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& w,
                               const torch::Tensor& b, double eps) {
    auto [y, mean, rstd] = kernels::layer_norm(x, w, b, eps);
    ctx->save_for_backward({x, w, mean, rstd});
    return y;
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool want_dx = ctx->needs_input_grad(0), want_dw = ctx->needs_input_grad(1),
               want_db = ctx->needs_input_grad(2);
    if (!want_dx && !want_dw && !want_db) return {torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
    auto g = kernels::layer_norm_backward(grads[0].contiguous(), saved[0], saved[1], saved[2], saved[3], want_dw, want_db);
    return {want_dx ? g.dx : torch::Tensor(), g.dweight, g.dbias, torch::Tensor()};
  }
};

struct SoftmaxAvx512 : torch::autograd::Function<SoftmaxAvx512> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x, double scale) {
    torch::Tensor y = kernels::softmax_lastdim(x, scale);
    ctx->save_for_backward({y});
    ctx->saved_data["scale"] = scale;
    return y;
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const double scale = ctx->saved_data["scale"].toDouble();
    return {kernels::softmax_lastdim_backward(ctx->get_saved_variables()[0], grads[0].contiguous(), scale),
            torch::Tensor()};
  }
};

struct GeluAvx512 : torch::autograd::Function<GeluAvx512> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x) {
    ctx->save_for_backward({x});
    return kernels::gelu(x);
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    return {kernels::gelu_backward(grads[0].contiguous(), ctx->get_saved_variables()[0])};
  }
};

struct ResidualAddAvx512 : torch::autograd::Function<ResidualAddAvx512> {
  static torch::Tensor forward(torch::autograd::AutogradContext*, const torch::Tensor& x, const torch::Tensor& a) {
    return kernels::add(x, a);
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext*, torch::autograd::tensor_list grads) {
    return {grads[0], grads[0]};
  }
};

// out[i] = a[i] @ b[i] over the flattened batch, one single-threaded GEMM per entry (BLAS runs
// on one thread inside a parallel region).
torch::Tensor per_entry_mm(const torch::Tensor& a, const torch::Tensor& b) {
  const int64_t M = a.size(-2), K = a.size(-1), N = b.size(-1);
  torch::Tensor A = a.reshape({-1, M, K}), B = b.reshape({-1, K, N});
  torch::Tensor out = torch::empty({A.size(0), M, N}, a.options());
  at::parallel_for(0, A.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      torch::Tensor o = out[i];
      at::mm_out(o, A[i], B[i]);
    }
  });
  std::vector<int64_t> sizes = a.sizes().vec();
  sizes.back() = N;
  return out.view(sizes);
}

// a @ b over equal batch dims by `kernel`: "per_entry" (above) or "onednn_matmul".
torch::Tensor batched_mm(const std::string& kernel, const torch::Tensor& a, const torch::Tensor& b) {
  return kernel == "onednn_matmul" ? onednn_matmul(a, b) : per_entry_mm(a, b);
}

struct BatchedMatmul : torch::autograd::Function<BatchedMatmul> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& a, const torch::Tensor& b,
                               const std::string& kernel) {
    ctx->save_for_backward({a, b});
    ctx->saved_data["kernel"] = kernel;
    return batched_mm(kernel, a, b);
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const std::string kernel = ctx->saved_data["kernel"].toStringRef();
    const torch::Tensor &a = saved[0], &b = saved[1], dc = grads[0].contiguous();
    // dA = dC B^T, dB = A^T dC (transposed views: both kernels read them in place)
    return {ctx->needs_input_grad(0) ? batched_mm(kernel, dc, b.transpose(-2, -1)) : torch::Tensor(),
            ctx->needs_input_grad(1) ? batched_mm(kernel, a.transpose(-2, -1), dc) : torch::Tensor(),
            torch::Tensor()};
  }
};

class CpuOps final : public Ops {
 public:
  explicit CpuOps(const CpuOptions& o)
      : options_(o),
        kernels_(o.bf16_kernels && kernels::available()),
        tuner_(o.frozen_gemm == FrozenGemm::Auto ? Tuner::cache_file_in(Tuner::resolve_cache_dir(o.cache_dir)) : "",
               o.repetitions) {
    if (o.frozen_gemm == FrozenGemm::OneDnn && !at::hasMKLDNN())
      throw std::invalid_argument("train.frozen_gemm=onednn: this LibTorch was built without oneDNN (MKLDNN)");
    if (o.frozen_gemm == FrozenGemm::OneDnnMatmul && !onednn_matmul_available())
      throw std::invalid_argument(
          "train.frozen_gemm=onednn_matmul: this build has no oneDNN headers (install Debian's libdnnl-dev and rebuild)");
  }

  std::string name() const override { return "cpu"; }

  torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b) const override {
    const auto dtype = x.scalar_type();
    const bool usual = x.device().is_cpu() && (dtype == torch::kFloat || dtype == torch::kBFloat16) &&
                       w.scalar_type() == dtype && (!b.defined() || b.scalar_type() == dtype) && x.dim() >= 2 &&
                       x.numel() / x.size(-1) * w.size(0) * w.size(1) >= options_.min_macs;
    if (!usual || options_.frozen_gemm == FrozenGemm::Blas) return torch::linear(x, w, b);
    if (w.requires_grad()) return trainable_linear(x, w, b);
    std::string fwd, bwd;
    if (options_.frozen_gemm == FrozenGemm::OneDnn) {
      fwd = bwd = dtype == torch::kFloat ? "onednn" : "blas";
    } else if (options_.frozen_gemm == FrozenGemm::OneDnnMatmul) {
      fwd = bwd = "onednn_matmul";
    } else {
      const int64_t M = x.numel() / x.size(-1), K = x.size(-1), N = w.size(0);
      fwd = choose_gemm(dtype, "fwd", M, K, N, [&] { return x.reshape({M, K}); }, w, true);
      // The input gradient's GEMM, chosen now (its shapes are known): dy [M, N] @ W [N, K],
      // timed on a stand-in dy made only when the key is new.
      if (x.requires_grad() && torch::GradMode::is_enabled())
        bwd = choose_gemm(dtype, "bwd", M, N, K, [&] { return torch::randn({M, N}, x.options()); }, w, false);
      else
        bwd = "blas";
    }
    // The bias in place (one pass, no new tensor): inside the GEMM's node when frozen; after it,
    // through autograd (which then sums dy for it), when it trains.
    const bool trained_bias = b.defined() && b.requires_grad();
    torch::Tensor y =
        FrozenMatmul::apply(x, w, trained_bias ? c10::optional<torch::Tensor>() : b, fwd, bwd, kernels_);
    return trained_bias ? y.add_(b) : y;
  }

  torch::Tensor matmul(const torch::Tensor& a, const torch::Tensor& b) const override {
    const auto dtype = a.scalar_type();
    const bool tuned = options_.frozen_gemm == FrozenGemm::Auto || options_.frozen_gemm == FrozenGemm::OneDnnMatmul;
    if (!tuned || !a.device().is_cpu() || a.dim() < 3 || b.dim() != a.dim() || b.scalar_type() != dtype ||
        (dtype != torch::kFloat && dtype != torch::kBFloat16))
      return torch::matmul(a, b);
    const bool same_batch = a.sizes().slice(0, a.dim() - 2) == b.sizes().slice(0, b.dim() - 2);  // no broadcasting
    if (!same_batch && dtype == torch::kFloat) return torch::matmul(a, b);
    if (options_.frozen_gemm == FrozenGemm::OneDnnMatmul)
      return same_batch ? BatchedMatmul::apply(a, b, "onednn_matmul") : torch::matmul(a, b);
    std::vector<Tuner::Candidate> candidates;
    if (dtype == torch::kFloat) {
      candidates.push_back(no_grad_candidate("torch", [&](bool) { torch::matmul(a, b); }));
      if (same_batch) candidates.push_back(no_grad_candidate("per_entry", [&](bool) { per_entry_mm(a, b); }));
    } else {
      candidates.push_back(no_grad_candidate("bf16", [&](bool) { torch::matmul(a, b); }));
      candidates.push_back(no_grad_candidate(
          "fp32", [&](bool) { torch::matmul(a.to(torch::kFloat), b.to(torch::kFloat)); }));
    }
    if (same_batch && onednn_matmul_available())
      candidates.push_back(no_grad_candidate("onednn_matmul", [&](bool) { onednn_matmul(a, b); }));
    const std::string key =
        std::string("matmul ") + dtype_name(dtype) + " " + shape_key(a.sizes()) + " @ " + shape_key(b.sizes()) + threads();
    const std::string pick = tuner_.choose(key, candidates);
    if (pick == "per_entry" || pick == "onednn_matmul") return BatchedMatmul::apply(a, b, pick);
    if (pick == "fp32") return torch::matmul(a.to(torch::kFloat), b.to(torch::kFloat)).to(dtype);
    return torch::matmul(a, b);
  }

  torch::Tensor layer_norm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b,
                           double eps) const override {
    if (!use_kernel("layer_norm", x, [&] {
          auto f = w.to(torch::kFloat), g = b.to(torch::kFloat);
          kernels::layer_norm(x, f, g, eps);
        }, [&] { Ops::layer_norm(x, w, b, eps); }))
      return Ops::layer_norm(x, w, b, eps);
    return LayerNormAvx512::apply(x, w.to(torch::kFloat), b.to(torch::kFloat), eps);
  }

  torch::Tensor gelu(const torch::Tensor& x) const override {
    if (!use_kernel("gelu", x, [&] { kernels::gelu(x); }, [&] { torch::gelu(x); })) return torch::gelu(x);
    return GeluAvx512::apply(x);
  }

  torch::Tensor residual_add(const torch::Tensor& x, const torch::Tensor& a) const override {
    if (!kernels::eligible(a) || x.sizes() != a.sizes() || x.scalar_type() != a.scalar_type() ||
        !use_kernel("residual_add", x, [&] { kernels::add(x, a); }, [&] { (void)(x + a); }))
      return x + a;
    return ResidualAddAvx512::apply(x, a);
  }

  bool softmax_takes_scale(torch::ScalarType dtype) const override {
    // The scale rides inside the kernel; where LibTorch's softmax is timed faster for a shape,
    // scaled_softmax scales first (one pass), which the old q scaling cost anyway.
    return kernels_for(dtype);
  }

  torch::Tensor scaled_softmax(const torch::Tensor& x, double scale) const override {
    if (!use_kernel("softmax", x, [&] { kernels::softmax_lastdim(x, scale); },
                    [&] { (void)(scale == 1.0 ? x : x * scale).softmax(-1); }))
      return Ops::scaled_softmax(x, scale);
    return SoftmaxAvx512::apply(x, scale);
  }

  nlohmann::json report() const override {
    nlohmann::json choices = nlohmann::json::object();
    for (const auto& [key, c] : tuner_.choices())
      choices[key] = {{"pick", c.pick}, {"us", c.us}, {"cached", c.cached}};
    nlohmann::json r = {{"frozen_gemm", frozen_gemm_name(options_.frozen_gemm)}, {"bf16_kernels", kernels_}};
    if (options_.frozen_gemm == FrozenGemm::Auto) {
      r["tuning_s"] = tuner_.seconds_measuring();
      r["cache"] = tuner_.cache_file().empty() ? nlohmann::json() : nlohmann::json(tuner_.cache_file());
      r["choices"] = choices;
    }
    return r;
  }

  void log_choices() const override {
    if (options_.frozen_gemm != FrozenGemm::Auto) return;
    const auto choices = tuner_.choices();
    size_t cached = 0;
    for (const auto& [key, c] : choices) cached += c.cached;
    spdlog::info("kernel choices: {} measured in {:.2f} s, {} from the cache {}", choices.size() - cached,
                 tuner_.seconds_measuring(), cached, tuner_.cache_file().empty() ? "(none)" : tuner_.cache_file());
    for (const auto& [key, c] : choices) {
      std::ostringstream times;
      for (const auto& [name, us] : c.us) times << " " << name << " " << static_cast<int64_t>(us) << " us";
      spdlog::info("  {:<44} {:<7}{}{}", key, c.pick, c.cached ? " (cached)" : "", times.str());
    }
  }

 private:
  static std::string threads() { return " t" + std::to_string(at::get_num_threads()); }

  static Tuner::Candidate no_grad_candidate(std::string name, std::function<void(bool)> run) {
    return {std::move(name), [run = std::move(run)](bool probe) {
              torch::NoGradGuard no_grad;
              run(probe);
            }};
  }

  // The frozen GEMM C [M, N] = a [M, K] @ op(w), forward (op = transpose) or input gradient.
  std::string choose_gemm(torch::ScalarType dtype, const char* dir, int64_t M, int64_t K, int64_t N,
                          const std::function<torch::Tensor()>& make_a, const torch::Tensor& w,
                          bool transpose) const {
    std::ostringstream key;
    key << "gemm " << dtype_name(dtype) << " " << dir << " " << M << "x" << K << "x" << N << threads();
    std::vector<Tuner::Candidate> candidates;
    torch::Tensor a;  // the left operand, made at the first candidate call (never for a known key)
    auto add = [&](const char* kernel) {
      candidates.push_back({kernel, [&, kernel](bool probe) {
                              torch::NoGradGuard no_grad;
                              if (!a.defined()) a = make_a();
                              const int64_t rows = probe ? std::min(M, kProbeRows) : M;
                              gemm(kernel, a.narrow(0, 0, rows), w, transpose, {rows, N});
                            }});
    };
    if (dtype == torch::kBFloat16) add("fp32");
    add("blas");
    if (at::hasMKLDNN()) add("onednn");
    if (onednn_matmul_available()) add("onednn_matmul");
    return tuner_.choose(key.str(), candidates);
  }

  // A bf16 GEMM of a trainable weight: LibTorch's bf16 linear, or its fp32 twin, by autograd.
  torch::Tensor trainable_linear(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b) const {
    if (options_.frozen_gemm != FrozenGemm::Auto || x.scalar_type() != torch::kBFloat16) return torch::linear(x, w, b);
    const int64_t M = x.numel() / x.size(-1);
    const std::string key = "linear bf16 trainable " + std::to_string(M) + "x" + std::to_string(x.size(-1)) + "x" +
                            std::to_string(w.size(0)) + threads();
    auto f32 = [](const torch::Tensor& t) { return t.defined() ? t.to(torch::kFloat) : t; };
    const std::string pick =
        tuner_.choose(key, {no_grad_candidate("bf16", [&](bool) { torch::linear(x, w, b); }),
                            no_grad_candidate("fp32", [&](bool) { torch::linear(f32(x), f32(w), f32(b)); })});
    if (pick == "bf16") return torch::linear(x, w, b);
    return torch::linear(f32(x), f32(w), f32(b)).to(x.scalar_type());
  }

  // Whether the AVX-512 kernels may take element-wise ops of this dtype: switched on; bf16
  // always; fp32 under auto (timed per shape) or with options_.fp32_kernels.
  bool kernels_for(torch::ScalarType dtype) const {
    return kernels_ && (dtype == torch::kBFloat16 ||
                        (dtype == torch::kFloat && (options_.frozen_gemm == FrozenGemm::Auto || options_.fp32_kernels)));
  }

  // Whether an element-wise op takes ShardTune's kernel: eligible, allowed for its dtype, and
  // under auto timed faster than LibTorch's op for this shape.
  template <class Kernel, class Torch>
  bool use_kernel(const char* op, const torch::Tensor& x, Kernel kernel, Torch libtorch) const {
    if (!kernels::eligible(x) || !kernels_for(x.scalar_type())) return false;
    if (options_.frozen_gemm != FrozenGemm::Auto) return true;
    const std::string key = std::string(op) + " " + dtype_name(x.scalar_type()) + " " + shape_key(x.sizes()) + threads();
    return tuner_.choose(key, {no_grad_candidate("avx512", [&](bool) { kernel(); }),
                               no_grad_candidate("torch", [&](bool) { libtorch(); })}) == "avx512";
  }

  CpuOptions options_;
  bool kernels_;
  mutable Tuner tuner_;
};

}  // namespace

std::shared_ptr<const Ops> make_cpu_ops(const CpuOptions& options) { return std::make_shared<const CpuOps>(options); }

torch::Tensor batched_matmul(const torch::Tensor& a, const torch::Tensor& b, const std::string& kernel) {
  if (kernel != "per_entry" && kernel != "onednn_matmul")
    throw std::invalid_argument("batched_matmul: kernel " + kernel + " must be per_entry or onednn_matmul");
  return BatchedMatmul::apply(a, b, kernel);
}

}  // namespace shardtune::ops
