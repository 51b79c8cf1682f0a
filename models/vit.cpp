#include "models/vit.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace shardtune {

namespace {

constexpr double kLayerNormEps = 1e-6;  // timm's ViT

std::shared_ptr<Op> layer_norm(int64_t width, const std::shared_ptr<const ops::Ops>& ops) {
  return std::make_shared<LayerNormOp>(width, ops);
}

}  // namespace

// Initialises the plain layers; a swapped-in layer initialises itself.
void init_layer(const std::shared_ptr<Op>& op) {
  if (!op) return;
  if (auto* ln = dynamic_cast<LayerNormOp*>(op.get())) {
    torch::nn::init::ones_(ln->weight);
    torch::nn::init::zeros_(ln->bias);
  } else if (auto* dense = dynamic_cast<DenseLinear*>(op.get())) {
    trunc_normal_(dense->weight, 0.02);
    if (dense->bias.defined()) torch::nn::init::zeros_(dense->bias);
  }
}

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

// --- DenseLinear ---------------------------------------------------------------------

DenseLinear::DenseLinear(int64_t in, int64_t out, bool with_bias, std::shared_ptr<const ops::Ops> o)
    : in_features(in), out_features(out), ops(std::move(o)) {
  weight = register_parameter("weight", torch::empty({out, in}));
  if (with_bias) bias = register_parameter("bias", torch::zeros({out}));
}

// Parameters follow the input's dtype (cast_like): with bf16 compute, frozen weights are
// stored in bf16 and trainable ones in fp32, cast on use so their gradients arrive in fp32.

torch::Tensor DenseLinear::enter(const torch::Tensor& x) const { return split == Split::Rows ? tp->enter(x) : x; }

torch::Tensor DenseLinear::local(const torch::Tensor& x) const {
  torch::Tensor b = split == Split::Cols ? torch::Tensor() : out_rows(region(bias));
  return ops->linear(x, cast_like(weight, x), cast_like(b, x));
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

LayerNormOp::LayerNormOp(int64_t w, std::shared_ptr<const ops::Ops> o) : width(w), ops(std::move(o)) {
  weight = register_parameter("weight", torch::ones({w}));
  bias = register_parameter("bias", torch::zeros({w}));
}

torch::Tensor LayerNormOp::forward(const torch::Tensor& x) {
  return ops->layer_norm(x, output_param(weight), output_param(bias), kLayerNormEps);
}

void set_ops(torch::nn::Module& model, const std::shared_ptr<const ops::Ops>& o) {
  auto give = [&](torch::nn::Module* m) {
    if (auto* d = dynamic_cast<DenseLinear*>(m)) d->ops = o;
    if (auto* n = dynamic_cast<LayerNormOp*>(m)) n->ops = o;
    if (auto* a = dynamic_cast<AttentionImpl*>(m)) a->ops = o;
    if (auto* p = dynamic_cast<MlpImpl*>(m)) p->ops = o;
    if (auto* b = dynamic_cast<BlockImpl*>(m)) b->ops = o;
    if (auto* e = dynamic_cast<PatchEmbedImpl*>(m)) e->ops = o;
    if (auto* v = dynamic_cast<VisionTransformerImpl*>(m)) v->ops = o;
  };
  give(&model);
  for (const auto& m : model.modules(/*include_self=*/false)) give(m.get());
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

AttentionImpl::AttentionImpl(const ViTConfig& c, std::shared_ptr<const ops::Ops> o)
    : heads(c.heads), scale(1.0 / std::sqrt(static_cast<double>(c.head_dim()))), ops(std::move(o)) {
  qkv = register_module("qkv", std::make_shared<DenseLinear>(c.dim, 3 * c.dim, c.qkv_bias, ops));
  if (c.qk_norm) {
    q_norm = register_module("q_norm", layer_norm(c.head_dim(), ops));
    k_norm = register_module("k_norm", layer_norm(c.head_dim(), ops));
  }
  proj = register_module("proj", std::make_shared<DenseLinear>(c.dim, c.dim, true, ops));
}

torch::Tensor AttentionImpl::forward(const torch::Tensor& x, int64_t queries) {
  const int64_t B = x.size(0), N = x.size(1), Q = queries > 0 ? std::min(queries, N) : N;
  // The local width may be D/tp under tensor parallelism: derive it from the qkv output.
  torch::Tensor qkv_out = qkv->forward(x);  // [B, N, 3 * H * hd]
  const int64_t local_width = qkv_out.size(2) / 3;
  // q [B, H, Q, hd], k and v [B, H, N, hd]. The scale goes on q in the split's copy, or after
  // the norm, or, where the softmax applies it for free, on the scores inside it.
  const bool scale_in_softmax = !q_norm && ops->softmax_takes_scale(qkv_out.scalar_type());
  auto [q, k, v] = ops->split_heads(qkv_out, heads, Q, q_norm || scale_in_softmax ? 1.0 : scale);
  if (q_norm) {
    q = q_norm->forward(q) * scale;
    k = k_norm->forward(k);
  }
  if (kv_extension) std::tie(k, v) = kv_extension->extend(k, v);
  torch::Tensor scores = ops->matmul(q, k.transpose(-2, -1));  // [B, H, Q, N]
  torch::Tensor attn = ops->scaled_softmax(scores, scale_in_softmax ? scale : 1.0);
  torch::Tensor out = ops->matmul(attn, v).transpose(1, 2).reshape({B, Q, local_width});
  return proj->forward(out);
}

// --- Mlp -------------------------------------------------------------------------------

MlpImpl::MlpImpl(const ViTConfig& c, std::shared_ptr<const ops::Ops> o) : ops(std::move(o)) {
  fc1 = register_module("fc1", std::make_shared<DenseLinear>(c.dim, c.mlp_dim, true, ops));
  fc2 = register_module("fc2", std::make_shared<DenseLinear>(c.mlp_dim, c.dim, true, ops));
}

torch::Tensor MlpImpl::forward(const torch::Tensor& x) { return fc2->forward(ops->gelu(fc1->forward(x))); }

// --- Block -----------------------------------------------------------------------------

BlockImpl::BlockImpl(const ViTConfig& c, std::shared_ptr<const ops::Ops> o) : ops(std::move(o)) {
  norm1 = register_module("norm1", layer_norm(c.dim, ops));
  attn = register_module("attn", Attention(c, ops));
  if (c.layer_scale > 0) {
    auto ls1 = register_module("ls1", std::make_shared<torch::nn::Module>());
    ls1_gamma = ls1->register_parameter("gamma", torch::full({c.dim}, c.layer_scale));
  }
  norm2 = register_module("norm2", layer_norm(c.dim, ops));
  mlp = register_module("mlp", Mlp(c, ops));
  if (c.layer_scale > 0) {
    auto ls2 = register_module("ls2", std::make_shared<torch::nn::Module>());
    ls2_gamma = ls2->register_parameter("gamma", torch::full({c.dim}, c.layer_scale));
  }
}

torch::Tensor BlockImpl::forward(const torch::Tensor& input, int64_t out_tokens) {
  torch::Tensor x = pre ? pre->forward(input) : input;
  torch::Tensor a = attn->forward(norm1->forward(x), out_tokens);
  if (out_tokens > 0 && out_tokens < x.size(1)) x = x.narrow(1, 0, out_tokens);
  torch::Tensor h = ops->residual_add(x, ls1_gamma.defined() ? a * cast_like(ls1_gamma, a) : a);
  torch::Tensor m = mlp->forward(norm2->forward(h));
  if (mlp_side) m = m + mlp_side->forward(h);
  return ops->residual_add(h, ls2_gamma.defined() ? m * cast_like(ls2_gamma, m) : m);
}

// --- PatchEmbed ------------------------------------------------------------------------

PatchEmbedImpl::PatchEmbedImpl(const ViTConfig& c, std::shared_ptr<const ops::Ops> o)
    : patch(c.patch_size), ops(std::move(o)) {
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
  return ops->linear(patches, w.reshape({w.size(0), -1}), cast_like(proj->bias, images));
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

VisionTransformerImpl::VisionTransformerImpl(const ViTConfig& c, const StagePart& stage, bool init,
                                             std::shared_ptr<const ops::Ops> o)
    : config(c), part(stage), ops(std::move(o)) {
  config.validate();
  if (part.first_block < 0 || part.end_block > c.depth || part.first_block > part.end_block)
    throw std::invalid_argument("blocks [" + std::to_string(part.first_block) + ", " + std::to_string(part.end_block) +
                                ") are not inside model.depth=" + std::to_string(c.depth));
  // Uninitialised storage (empty) stays untouched until written, so a rank that replaces a
  // layer by its shard or loads a checkpoint never makes the full tensor resident.
  if (part.embed) {
    patch_embed = register_module("patch_embed", PatchEmbed(c, ops));
    cls_token = register_parameter("cls_token", torch::empty({1, 1, c.dim}));
    pos_embed = register_parameter("pos_embed", torch::empty({1, c.num_tokens(), c.dim}));
  }
  blocks = register_module("blocks", std::make_shared<torch::nn::Module>());
  for (int64_t i = part.first_block; i < part.end_block; ++i)
    stage_blocks.push_back(blocks->register_module(std::to_string(i), Block(c, ops)));
  if (part.head) {
    if (c.global_pool == "avg") {
      fc_norm = register_module("fc_norm", layer_norm(c.dim, ops));
    } else {
      norm = register_module("norm", layer_norm(c.dim, ops));
    }
    if (c.num_classes > 0)
      head = register_module("head", std::make_shared<DenseLinear>(c.dim, c.num_classes, true, ops));
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
    init_layer(op);
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

torch::Tensor VisionTransformerImpl::pool(const torch::Tensor& tokens) const {
  return config.global_pool == "avg" ? tokens.slice(1, num_prefix_tokens).mean(1)  // mean over patches only
                                     : tokens.select(1, 0);
}

torch::Tensor VisionTransformerImpl::features(const torch::Tensor& tokens) {
  // The norm acts per token: pooling the cls token first is exact; avg pools, then norms.
  return (config.global_pool == "avg" ? fc_norm : norm)->forward(pool(tokens));
}

bool VisionTransformerImpl::last_block_cls_only() const {
  return part.head && config.global_pool != "avg" && !stage_blocks.empty() && !stage_blocks.back()->side;
}

torch::Tensor VisionTransformerImpl::head_forward(const torch::Tensor& tokens) {
  torch::Tensor pooled = features(tokens);
  return head ? head->forward(pooled) : pooled;
}

torch::Tensor VisionTransformerImpl::side_forward(const torch::Tensor& input) {
  const int64_t D = config.dim;
  torch::Tensor x, h;
  {
    torch::NoGradGuard frozen;
    x = part.embed ? embed(input) : input.narrow(-1, 0, D);
  }
  h = part.embed ? side_in->forward(x) : input.narrow(-1, D, side_width);
  const bool cls_only = last_block_cls_only();
  for (size_t i = 0; i < stage_blocks.size(); ++i) {
    Block& b = stage_blocks[i];
    {
      torch::NoGradGuard frozen;
      x = b->forward(x, cls_only && i + 1 == stage_blocks.size() ? 1 : 0);
    }
    if (b->side) h = b->side->forward(x, h);
  }
  if (!part.head) return torch::cat({x, h}, -1);
  torch::Tensor f;
  {
    torch::NoGradGuard frozen;
    f = features(x);
  }
  if (side_out) f = f + side_out->forward(pool(h));
  return head ? head->forward(f) : f;
}

std::vector<torch::Tensor> VisionTransformerImpl::frozen_outputs(const torch::Tensor& images) {
  if (!part.embed || !part.head) throw std::logic_error("frozen_outputs: a whole model only");
  torch::NoGradGuard frozen;
  std::vector<torch::Tensor> out;
  torch::Tensor x = embed(images);
  const bool side = side_width > 0;
  if (side) out.push_back(x);
  const bool cls_only = last_block_cls_only();
  for (size_t i = 0; i < stage_blocks.size(); ++i) {
    x = stage_blocks[i]->forward(x, cls_only && i + 1 == stage_blocks.size() ? 1 : 0);
    if (side && stage_blocks[i]->side) out.push_back(x);
  }
  out.push_back(features(x));
  return out;
}

torch::Tensor VisionTransformerImpl::from_frozen_outputs(const std::vector<torch::Tensor>& outputs) {
  torch::Tensor f = outputs.back();
  if (side_width > 0) {
    size_t k = 0;
    torch::Tensor h = side_in->forward(outputs.at(k++));
    for (Block& b : stage_blocks)
      if (b->side) h = b->side->forward(outputs.at(k++), h);
    f = f + side_out->forward(pool(h));
  }
  return head ? head->forward(f) : f;
}

std::vector<std::vector<int64_t>> VisionTransformerImpl::frozen_output_shapes() const {
  std::vector<std::vector<int64_t>> out;
  const std::vector<int64_t> tokens{config.num_tokens(), config.dim};
  if (side_width > 0) {
    out.push_back(tokens);
    for (const Block& b : stage_blocks)
      if (b->side) out.push_back(tokens);
  }
  out.push_back({config.dim});
  return out;
}

torch::Tensor VisionTransformerImpl::forward(const torch::Tensor& input) {
  if (side_width > 0) return side_forward(input);
  torch::Tensor x = part.embed ? embed(input) : input;
  const bool cls_only = last_block_cls_only();
  for (size_t i = 0; i < stage_blocks.size(); ++i)
    x = stage_blocks[i]->forward(x, cls_only && i + 1 == stage_blocks.size() ? 1 : 0);
  return part.head ? head_forward(x) : x;
}

}  // namespace shardtune
