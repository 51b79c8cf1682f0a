#include "models/vit.h"

#include <ATen/Context.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <stdexcept>

#include "models/cpu_kernels.h"

namespace shardtune {

namespace {

constexpr double kLayerNormEps = 1e-6;  // timm's ViT

std::shared_ptr<Op> layer_norm(int64_t width) { return std::make_shared<LayerNormOp>(width); }

// Initialises the plain layers; a swapped-in layer initialises itself.
void init_op(const std::shared_ptr<Op>& op) {
  if (!op) return;
  if (auto* ln = dynamic_cast<LayerNormOp*>(op.get())) {
    torch::nn::init::ones_(ln->weight);
    torch::nn::init::zeros_(ln->bias);
  } else if (auto* dense = dynamic_cast<DenseLinear*>(op.get())) {
    trunc_normal_(dense->weight, 0.02);
    if (dense->bias.defined()) torch::nn::init::zeros_(dense->bias);
  }
}

}  // namespace

void seed_for_path(uint64_t seed, const std::string& path) {
  uint64_t h = 1469598103934665603ull ^ seed;  // FNV-1a over the seed and the path
  for (unsigned char ch : path) h = (h ^ ch) * 1099511628211ull;
  torch::manual_seed(h >> 1);
}

void trunc_normal_(torch::Tensor t, double std) {
  // Inverse-CDF sampling of N(0,1) restricted to [-2, 2], then scaled.
  torch::NoGradGuard no_grad;
  const double a = -2.0, b = 2.0;
  auto cdf = [](double x) { return (1.0 + std::erf(x / std::sqrt(2.0))) / 2.0; };
  double l = cdf(a), u = cdf(b);
  t.uniform_(2 * l - 1, 2 * u - 1);
  t.erfinv_();
  t.mul_(std * std::sqrt(2.0));
  t.clamp_(a * std, b * std);
}

// --- Frozen GEMMs ---------------------------------------------------------------------

namespace {

std::atomic<FrozenGemm> g_frozen_gemm{at::hasMKLDNN() ? FrozenGemm::OneDnn : FrozenGemm::Blas};

std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  auto out = sizes.vec();
  out.back() = last;
  return out;
}

// a [M, K] @ b [K, N] for a frozen GEMM, as a fresh dense tensor of `shape` (not a view: the
// caller adds the bias into it in place, which autograd forbids on a view made inside a
// custom function).
// fp32: oneDNN's inner-product backward-data kernel (grad_input = grad_output @ weight with
// weight [out, in] = b, read in plain layout), 1.0-1.9x LibTorch's BLAS here.
// bf16: one mm, oneDNN's bf16 GEMM as torch::linear's, but without addmm's broadcast of the
// bias into the output first: the ViT-B bf16 step is 3-6% faster (bench/step_ab.cpp).
torch::Tensor frozen_mm(const torch::Tensor& a, const torch::Tensor& b, at::IntArrayRef shape) {
  if (a.scalar_type() == torch::kFloat) {
    torch::Tensor y = at::mkldnn_linear_backward_input({a.size(0), b.size(1)}, a.contiguous().to_mkldnn(), b.contiguous());
    return y.reshape(shape).to_dense();
  }
  torch::Tensor y = torch::empty(shape, a.options());
  torch::Tensor y2d = y.view({-1, b.size(1)});
  torch::mm_out(y2d, a, b);
  return y;
}

// y = x W^T (+ b) with W and b frozen; backward dx = dy W. Only W is saved (torch::linear's
// addmm node would also keep x for a weight gradient); W and b are never copied or
// differentiated. The bias goes into y in place, in bf16 by one AVX-512 pass (a quarter of
// LibTorch's add_ time, bench/kernels_ab.cpp).
struct FrozenMatmul : torch::autograd::Function<FrozenMatmul> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& w,
                               const c10::optional<torch::Tensor>& b) {
    ctx->save_for_backward({w});
    torch::Tensor y = frozen_mm(x.reshape({-1, x.size(-1)}), w.t(), with_last(x.sizes(), w.size(0)));
    if (!b || !b->defined()) return y;
    if (kernels::eligible(y)) {
      kernels::add_bias_(y, *b);
      return y;
    }
    return y.add_(*b);
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const torch::Tensor w = ctx->get_saved_variables()[0];
    const torch::Tensor& dy = grads[0];
    return {frozen_mm(dy.reshape({-1, dy.size(-1)}), w, with_last(dy.sizes(), w.size(1))), torch::Tensor(),
            torch::Tensor()};
  }
};

std::atomic<int64_t> g_onednn_min_macs{kOneDnnMinMacs};

}  // namespace

void set_frozen_gemm(FrozenGemm path, int64_t min_macs) {
  if (path == FrozenGemm::OneDnn && !at::hasMKLDNN())
    throw std::invalid_argument("train.frozen_gemm=onednn: this LibTorch was built without oneDNN (MKLDNN)");
  g_frozen_gemm = path;
  g_onednn_min_macs = min_macs;
}

FrozenGemm frozen_gemm() { return g_frozen_gemm; }

FrozenGemm parse_frozen_gemm(const std::string& name) {
  for (FrozenGemm path : {FrozenGemm::Blas, FrozenGemm::OneDnn})
    if (name == frozen_gemm_name(path)) return path;
  throw std::invalid_argument("train.frozen_gemm=" + name + " must be onednn or blas");
}

std::string frozen_gemm_name(FrozenGemm path) { return path == FrozenGemm::OneDnn ? "onednn" : "blas"; }

torch::Tensor frozen_aware_linear(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b) {
  const auto dtype = x.scalar_type();
  const bool eligible = g_frozen_gemm == FrozenGemm::OneDnn && !w.requires_grad() && x.device().is_cpu() &&
                        (dtype == torch::kFloat || dtype == torch::kBFloat16) && w.scalar_type() == dtype &&
                        (!b.defined() || b.scalar_type() == dtype) && x.dim() >= 2 &&
                        x.numel() / x.size(-1) * w.size(0) * w.size(1) >= g_onednn_min_macs;
  if (!eligible) return torch::linear(x, w, b);
  // The bias in place (one pass, no new tensor): inside the GEMM's node when frozen; after it,
  // through autograd (which then sums dy for it), when it trains.
  const bool trained_bias = b.defined() && b.requires_grad();
  torch::Tensor y = FrozenMatmul::apply(x, w, trained_bias ? c10::optional<torch::Tensor>() : b);
  return trained_bias ? y.add_(b) : y;
}

// --- DenseLinear ---------------------------------------------------------------------

DenseLinear::DenseLinear(int64_t in, int64_t out, bool with_bias) : in_features(in), out_features(out) {
  weight = register_parameter("weight", torch::empty({out, in}));
  if (with_bias) bias = register_parameter("bias", torch::zeros({out}));
}

// Parameters follow the input's dtype (cast_like): with bf16 compute, frozen weights are
// stored in bf16 and trainable ones in fp32, cast on use so their gradients arrive in fp32.

torch::Tensor DenseLinear::enter(const torch::Tensor& x) const { return split == Split::Rows ? tp->enter(x) : x; }

torch::Tensor DenseLinear::local(const torch::Tensor& x) const {
  torch::Tensor b = split == Split::Cols ? torch::Tensor() : out_rows(region(bias));
  return frozen_aware_linear(x, cast_like(weight, x), cast_like(b, x));
}

torch::Tensor DenseLinear::leave(const torch::Tensor& y) const {
  if (split != Split::Cols) return y;
  torch::Tensor sum = tp->reduce(y);
  return bias.defined() ? sum + cast_like(bias, sum) : sum;
}

torch::Tensor DenseLinear::region(const torch::Tensor& p) const {
  return split == Split::None || !p.defined() ? p : tp->enter(p);
}

torch::Tensor DenseLinear::out_rows(const torch::Tensor& t, int64_t offset) const {
  if (split != Split::Rows || !t.defined()) return t;
  auto [start, count] = local_range(offset, t.size(0));
  return t.index_select(0, shard_index.narrow(0, start, count) - offset);
}

torch::Tensor DenseLinear::in_cols(const torch::Tensor& t, int64_t dim) const {
  return split == Split::Cols ? t.index_select(dim, shard_index) : t;
}

std::pair<int64_t, int64_t> DenseLinear::local_range(int64_t offset, int64_t n) const {
  if (split != Split::Rows) return {offset, n};
  // shard_index ascends: the held rows inside [offset, offset + n) are one run of it.
  const auto* idx = shard_index.data_ptr<int64_t>();
  const int64_t len = shard_index.numel();
  int64_t start = 0;
  while (start < len && idx[start] < offset) ++start;
  int64_t end = start;
  while (end < len && idx[end] < offset + n) ++end;
  return {start, end - start};
}

// A row-parallel layer's output is whole and replicated after its sum: nothing to do there.
torch::Tensor DenseLinear::output_param(const torch::Tensor& p) const {
  return split == Split::Rows ? out_rows(region(p)) : p;
}

LayerNormOp::LayerNormOp(int64_t w) : width(w) {
  weight = register_parameter("weight", torch::ones({w}));
  bias = register_parameter("bias", torch::zeros({w}));
}

namespace {

// LayerNorm of a bf16 x (fp32 statistics and arithmetic, bf16 output) by the AVX-512 kernels:
// one pass each way instead of the casts around LibTorch's fp32 kernel (about a quarter of
// their time, bench/kernels_ab.cpp). w and b are fp32; their gradients are computed only when
// they train.
struct LayerNormBf16 : torch::autograd::Function<LayerNormBf16> {
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

}  // namespace

torch::Tensor LayerNormOp::forward(const torch::Tensor& x) {
  if (x.scalar_type() != torch::kBFloat16 && x.scalar_type() != torch::kHalf)
    return torch::layer_norm(x, {width}, cast_like(output_param(weight), x), cast_like(output_param(bias), x), kLayerNormEps);
  // Reduced precision (bf16): statistics and normalisation in fp32, output in the input's
  // dtype. More accurate, and faster: LibTorch 1.13's bf16 CPU kernel takes 10x the time of
  // the two casts plus the fp32 kernel (4.4 ms against 0.44 ms on a ViT-B activation).
  const auto f32 = torch::kFloat;
  torch::Tensor w = output_param(weight).to(f32), b = output_param(bias).to(f32);
  if (kernels::eligible(x)) return LayerNormBf16::apply(x, w, b, kLayerNormEps);
  return torch::layer_norm(x.to(f32), {width}, w, b, kLayerNormEps).to(x.scalar_type());
}

// --- Slots -----------------------------------------------------------------------------

void Slot::replace(std::shared_ptr<Op> op) const { *member = owner->replace_module(name, std::move(op)); }

std::vector<Slot> slots(VisionTransformerImpl& m) {
  std::vector<Slot> out;
  auto add = [&](const std::string& prefix, Slot::Kind kind, torch::nn::Module* owner, const std::string& name,
                 std::shared_ptr<Op>* member) {
    if (*member) out.push_back({prefix + name, kind, owner, name, member});
  };
  using K = Slot::Kind;
  for (size_t i = 0; i < m.num_blocks(); ++i) {
    BlockImpl* b = m.block(i).get();
    const std::string p = "blocks." + std::to_string(m.block_index(i)) + ".";
    add(p, K::Norm, b, "norm1", &b->norm1);
    add(p + "attn.", K::Linear, b->attn.get(), "qkv", &b->attn->qkv);
    add(p + "attn.", K::Norm, b->attn.get(), "q_norm", &b->attn->q_norm);
    add(p + "attn.", K::Norm, b->attn.get(), "k_norm", &b->attn->k_norm);
    add(p + "attn.", K::Linear, b->attn.get(), "proj", &b->attn->proj);
    add(p, K::Norm, b, "norm2", &b->norm2);
    add(p + "mlp.", K::Linear, b->mlp.get(), "fc1", &b->mlp->fc1);
    add(p + "mlp.", K::Linear, b->mlp.get(), "fc2", &b->mlp->fc2);
  }
  add("", K::Norm, &m, "norm", &m.norm);
  add("", K::Norm, &m, "fc_norm", &m.fc_norm);
  add("", K::Linear, &m, "head", &m.head);
  return out;
}

// --- Attention -------------------------------------------------------------------------

namespace {

// qkv [B, N, 3 * H * hd] -> q [B, H, Q, hd] (the first Q tokens, times `q_scale`), k and v
// [B, H, N, hd], each contiguous: one copy per part, after which the attention GEMMs read
// them in place (k transposed by strides). The backward writes the three gradients straight
// into one [B, N, 3 * H * hd] tensor. Through autograd's own permute and select the same
// split costs a full-size zero tensor per part and their sum (select's backward), a
// permuted-back copy, the GEMMs' own copies of the strided k and v, and a separate scaling
// pass each way.
struct SplitHeads : torch::autograd::Function<SplitHeads> {
  static torch::autograd::tensor_list forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& qkv,
                                              int64_t heads, int64_t queries, double q_scale) {
    const int64_t B = qkv.size(0), N = qkv.size(1), hd = qkv.size(2) / (3 * heads);
    ctx->saved_data["q_scale"] = q_scale;
    auto parts = qkv.view({B, N, 3, heads, hd}).permute({2, 0, 3, 1, 4});  // [3, B, H, N, hd], strided
    auto part = [&](int64_t i, int64_t tokens) {
      return torch::empty({B, heads, tokens, hd}, qkv.options()).copy_(parts[i].narrow(2, 0, tokens));
    };
    torch::Tensor q = part(0, queries);
    if (q_scale != 1.0) q.mul_(q_scale);
    return {q, part(1, N), part(2, N)};
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const double q_scale = ctx->saved_data["q_scale"].toDouble();
    // Gradients of unused outputs arrive as zeros (materialised), so all three are defined.
    const torch::Tensor &gq = grads[0], &gk = grads[1], &gv = grads[2];
    const int64_t B = gk.size(0), heads = gk.size(1), N = gk.size(2), hd = gk.size(3), Q = gq.size(2);
    torch::Tensor g = torch::empty({B, N, 3, heads, hd}, gk.options());
    auto parts = g.permute({2, 0, 3, 1, 4});
    if (Q < N) parts[0].narrow(2, Q, N - Q).zero_();  // q rows past Q: no gradient
    torch::Tensor gq_rows = parts[0].narrow(2, 0, Q).copy_(gq);
    if (q_scale != 1.0) gq_rows.mul_(q_scale);
    parts[1].copy_(gk);
    parts[2].copy_(gv);
    return {g.view({B, N, 3 * heads * hd}), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

// softmax(scale * x) over the last dimension by the AVX-512 bf16 kernels (about a third of
// LibTorch's time each way, bench/kernels_ab.cpp), the attention scale applied on the fly; the
// output is saved for the backward, as by LibTorch.
struct SoftmaxBf16 : torch::autograd::Function<SoftmaxBf16> {
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

torch::Tensor scaled_softmax(const torch::Tensor& x, double scale) {
  if (kernels::eligible(x)) return SoftmaxBf16::apply(x, scale);
  return (scale == 1.0 ? x : x * scale).softmax(-1);
}

}  // namespace

AttentionImpl::AttentionImpl(const ViTConfig& c)
    : heads(c.heads), scale(1.0 / std::sqrt(static_cast<double>(c.head_dim()))) {
  qkv = register_module("qkv", std::make_shared<DenseLinear>(c.dim, 3 * c.dim, c.qkv_bias));
  if (c.qk_norm) {
    q_norm = register_module("q_norm", layer_norm(c.head_dim()));
    k_norm = register_module("k_norm", layer_norm(c.head_dim()));
  }
  proj = register_module("proj", std::make_shared<DenseLinear>(c.dim, c.dim, true));
}

torch::Tensor AttentionImpl::forward(const torch::Tensor& x, int64_t queries) {
  const int64_t B = x.size(0), N = x.size(1), Q = queries > 0 ? std::min(queries, N) : N;
  // The local width may be D/tp under tensor parallelism: derive it from the qkv output.
  torch::Tensor qkv_out = qkv->forward(x);  // [B, N, 3 * H * hd]
  const int64_t local_width = qkv_out.size(2) / 3;
  // q [B, H, Q, hd], k and v [B, H, N, hd]. The scale goes on q in the split's copy, or after
  // the norm, or, where the bf16 softmax kernel runs, on the scores inside it (no pass at all).
  const bool scale_in_softmax = !q_norm && kernels::bf16_kernels() && qkv_out.scalar_type() == torch::kBFloat16;
  auto qkv_parts = SplitHeads::apply(qkv_out, heads, Q, q_norm || scale_in_softmax ? 1.0 : scale);
  torch::Tensor q = qkv_parts[0], k = qkv_parts[1], v = qkv_parts[2];
  if (q_norm) {
    q = q_norm->forward(q) * scale;
    k = k_norm->forward(k);
  }
  if (kv_extension) std::tie(k, v) = kv_extension->extend(k, v);
  torch::Tensor scores = torch::matmul(q, k.transpose(-2, -1));  // [B, H, Q, N]
  torch::Tensor attn = scaled_softmax(scores, scale_in_softmax ? scale : 1.0);
  torch::Tensor out = torch::matmul(attn, v).transpose(1, 2).reshape({B, Q, local_width});
  return proj->forward(out);
}

// --- Mlp -------------------------------------------------------------------------------

MlpImpl::MlpImpl(const ViTConfig& c) {
  fc1 = register_module("fc1", std::make_shared<DenseLinear>(c.dim, c.mlp_dim, true));
  fc2 = register_module("fc2", std::make_shared<DenseLinear>(c.mlp_dim, c.dim, true));
}

namespace {

// The exact GELU by the AVX-512 bf16 kernels (about half of oneDNN's time each way in
// LibTorch, bench/kernels_ab.cpp); the input is saved for the backward, as by LibTorch.
struct GeluBf16 : torch::autograd::Function<GeluBf16> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x) {
    ctx->save_for_backward({x});
    return kernels::gelu(x);
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    return {kernels::gelu_backward(grads[0].contiguous(), ctx->get_saved_variables()[0])};
  }
};

// (not `gelu`: at::gelu would clash with it by argument-dependent lookup)
torch::Tensor exact_gelu(const torch::Tensor& x) { return kernels::eligible(x) ? GeluBf16::apply(x) : torch::gelu(x); }

}  // namespace

torch::Tensor MlpImpl::forward(const torch::Tensor& x) { return fc2->forward(exact_gelu(fc1->forward(x))); }

// --- Block -----------------------------------------------------------------------------

BlockImpl::BlockImpl(const ViTConfig& c) {
  norm1 = register_module("norm1", layer_norm(c.dim));
  attn = register_module("attn", Attention(c));
  if (c.layer_scale > 0) {
    auto ls1 = register_module("ls1", std::make_shared<torch::nn::Module>());
    ls1_gamma = ls1->register_parameter("gamma", torch::full({c.dim}, c.layer_scale));
  }
  norm2 = register_module("norm2", layer_norm(c.dim));
  mlp = register_module("mlp", Mlp(c));
  if (c.layer_scale > 0) {
    auto ls2 = register_module("ls2", std::make_shared<torch::nn::Module>());
    ls2_gamma = ls2->register_parameter("gamma", torch::full({c.dim}, c.layer_scale));
  }
}

namespace {

// A residual sum of two bf16 activations by the AVX-512 kernel (under half of LibTorch's add's
// time here, bench/kernels_ab.cpp); the gradient passes to both unchanged.
struct ResidualAddBf16 : torch::autograd::Function<ResidualAddBf16> {
  static torch::Tensor forward(torch::autograd::AutogradContext*, const torch::Tensor& x, const torch::Tensor& a) {
    return kernels::add(x, a);
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext*, torch::autograd::tensor_list grads) {
    return {grads[0], grads[0]};
  }
};

torch::Tensor residual(const torch::Tensor& x, const torch::Tensor& a) {
  return kernels::eligible(x) && kernels::eligible(a) && x.sizes() == a.sizes() ? ResidualAddBf16::apply(x, a) : x + a;
}

}  // namespace

torch::Tensor BlockImpl::forward(const torch::Tensor& input, int64_t out_tokens) {
  torch::Tensor x = pre ? pre->forward(input) : input;
  torch::Tensor a = attn->forward(norm1->forward(x), out_tokens);
  if (out_tokens > 0 && out_tokens < x.size(1)) x = x.narrow(1, 0, out_tokens);
  torch::Tensor h = residual(x, ls1_gamma.defined() ? a * cast_like(ls1_gamma, a) : a);
  torch::Tensor m = mlp->forward(norm2->forward(h));
  if (mlp_side) m = m + mlp_side->forward(h);
  return residual(h, ls2_gamma.defined() ? m * cast_like(ls2_gamma, m) : m);
}

// --- PatchEmbed ------------------------------------------------------------------------

PatchEmbedImpl::PatchEmbedImpl(const ViTConfig& c) : patch(c.patch_size) {
  proj = register_module(
      "proj", torch::nn::Conv2d(torch::nn::Conv2dOptions(c.in_chans, c.dim, c.patch_size).stride(c.patch_size)));
}

// The patch_size-strided convolution as one GEMM over the flattened patches: [B * gh * gw,
// C * p * p] x [C * p * p, D], each patch in the weight's (C, p, p) order, written straight
// in the [B, gh * gw, D] layout the blocks read. Through torch::conv2d oneDNN reorders the
// weight and the output on every call (16 ms of the ViT-B bf16 step, 8 of them the
// convolution; the GEMM takes 6.6 ms, bench/onednn_breakdown.py). Pixels past the last whole
// patch are dropped, as by the convolution.
torch::Tensor PatchEmbedImpl::forward(const torch::Tensor& images) {
  const int64_t B = images.size(0), C = images.size(1), gh = images.size(2) / patch, gw = images.size(3) / patch;
  torch::Tensor patches = images.narrow(2, 0, gh * patch)
                              .narrow(3, 0, gw * patch)
                              .reshape({B, C, gh, patch, gw, patch})
                              .permute({0, 2, 4, 1, 3, 5})
                              .reshape({B, gh * gw, C * patch * patch});
  torch::Tensor w = cast_like(proj->weight, images);
  return frozen_aware_linear(patches, w.reshape({w.size(0), -1}), cast_like(proj->bias, images));
}

// --- VisionTransformer -----------------------------------------------------------------

StagePart StagePart::of(const ViTConfig& c, int stage, int stages) {
  StagePart p;
  p.first_block = c.depth * stage / stages;
  p.end_block = c.depth * (stage + 1) / stages;
  p.embed = stage == 0;
  p.head = stage == stages - 1;
  return p;
}

VisionTransformerImpl::VisionTransformerImpl(const ViTConfig& c, const StagePart& stage, bool init)
    : config(c), part(stage) {
  config.validate();
  if (part.first_block < 0 || part.end_block > c.depth || part.first_block > part.end_block)
    throw std::invalid_argument("blocks [" + std::to_string(part.first_block) + ", " + std::to_string(part.end_block) +
                                ") are not inside model.depth=" + std::to_string(c.depth));
  // Uninitialised storage (empty) stays untouched until written, so a rank that replaces a
  // layer by its shard or loads a checkpoint never makes the full tensor resident.
  if (part.embed) {
    patch_embed = register_module("patch_embed", PatchEmbed(c));
    cls_token = register_parameter("cls_token", torch::empty({1, 1, c.dim}));
    pos_embed = register_parameter("pos_embed", torch::empty({1, c.num_tokens(), c.dim}));
  }
  blocks = register_module("blocks", std::make_shared<torch::nn::Module>());
  for (int64_t i = part.first_block; i < part.end_block; ++i)
    stage_blocks.push_back(blocks->register_module(std::to_string(i), Block(c)));
  if (part.head) {
    if (c.global_pool == "avg") {
      fc_norm = register_module("fc_norm", layer_norm(c.dim));
    } else {
      norm = register_module("norm", layer_norm(c.dim));
    }
    if (c.num_classes > 0) head = register_module("head", std::make_shared<DenseLinear>(c.dim, c.num_classes, true));
  }
  if (init) init_weights();
}

void VisionTransformerImpl::init_weights() {
  torch::NoGradGuard no_grad;
  // Each tensor from (seed, its module path): a pipeline stage that builds blocks [a, b) draws
  // what one process building every block does (DESIGN.md's numerical contract).
  const uint64_t seed = at::detail::getDefaultCPUGenerator().current_seed();
  auto init_at = [&](const std::string& path, const std::shared_ptr<Op>& op) {
    seed_for_path(seed, path);
    init_op(op);
  };
  if (part.embed) {
    seed_for_path(seed, "pos_embed");
    trunc_normal_(pos_embed, 0.02);
    seed_for_path(seed, "cls_token");
    cls_token.normal_(0.0, 1e-6);
    seed_for_path(seed, "patch_embed.proj");
    patch_embed->proj->reset_parameters();  // PyTorch's default conv init, as timm keeps it
  }
  for (size_t i = 0; i < num_blocks(); ++i) {
    Block b = block(i);
    const std::string p = "blocks." + std::to_string(part.first_block + static_cast<int64_t>(i)) + ".";
    const std::pair<const char*, const std::shared_ptr<Op>*> ops[] = {
        {"norm1", &b->norm1},         {"norm2", &b->norm2},         {"attn.q_norm", &b->attn->q_norm},
        {"attn.k_norm", &b->attn->k_norm}, {"attn.qkv", &b->attn->qkv}, {"attn.proj", &b->attn->proj},
        {"mlp.fc1", &b->mlp->fc1},    {"mlp.fc2", &b->mlp->fc2}};
    for (const auto& [name, op] : ops) init_at(p + name, *op);
    if (b->ls1_gamma.defined()) b->ls1_gamma.fill_(config.layer_scale);
    if (b->ls2_gamma.defined()) b->ls2_gamma.fill_(config.layer_scale);
  }
  init_at("norm", norm);
  init_at("fc_norm", fc_norm);
  init_at("head", head);
}

torch::Tensor VisionTransformerImpl::embed(const torch::Tensor& images) {
  torch::Tensor x = patch_embed->forward(images);                      // [B, N, D]
  torch::Tensor cls = cast_like(cls_token, x).expand({x.size(0), -1, -1});   // [B, 1, D]
  return torch::cat({cls, x}, 1) + cast_like(pos_embed, x);                   // [B, N+1, D]
}

torch::Tensor VisionTransformerImpl::head_forward(const torch::Tensor& tokens) {
  torch::Tensor pooled;
  if (config.global_pool == "avg") {
    pooled = fc_norm->forward(tokens.slice(1, num_prefix_tokens).mean(1));  // mean over patches only
  } else {
    pooled = norm->forward(tokens.select(1, 0));  // cls token after norm (norm is per token)
  }
  return head ? head->forward(pooled) : pooled;
}

torch::Tensor VisionTransformerImpl::forward(const torch::Tensor& input) {
  torch::Tensor x = part.embed ? embed(input) : input;
  // Only token 0 reaches a cls-pooled head: the last block computes it alone.
  const bool cls_only = part.head && config.global_pool != "avg";
  for (size_t i = 0; i < stage_blocks.size(); ++i)
    x = stage_blocks[i]->forward(x, cls_only && i + 1 == stage_blocks.size() ? 1 : 0);
  return part.head ? head_forward(x) : x;
}

}  // namespace shardtune
