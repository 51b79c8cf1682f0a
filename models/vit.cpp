#include "models/vit.h"

#include <cmath>

namespace shardtune {

namespace {

constexpr double kLayerNormEps = 1e-6;  // timm's ViT

torch::nn::LayerNorm layer_norm(int64_t width) {
  return torch::nn::LayerNorm(torch::nn::LayerNormOptions({width}).eps(kLayerNormEps));
}

void reset_layer_norm(torch::nn::LayerNorm& ln) {
  if (!ln) return;
  torch::nn::init::ones_(ln->weight);
  torch::nn::init::zeros_(ln->bias);
}

void init_linear(LinearLayer& layer) {
  auto* dense = dynamic_cast<DenseLinear*>(&layer);
  if (!dense) return;  // a swapped-in layer initialises itself
  trunc_normal_(dense->weight, 0.02);
  if (dense->bias.defined()) torch::nn::init::zeros_(dense->bias);
}

}  // namespace

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

DenseLinear::DenseLinear(int64_t in_features, int64_t out_features, bool with_bias) {
  weight = register_parameter("weight", torch::empty({out_features, in_features}));
  if (with_bias) bias = register_parameter("bias", torch::zeros({out_features}));
}

torch::Tensor DenseLinear::forward(const torch::Tensor& x) { return torch::linear(x, weight, bias); }

// --- Attention -------------------------------------------------------------------------

AttentionImpl::AttentionImpl(const ViTConfig& c)
    : heads(c.heads), scale(1.0 / std::sqrt(static_cast<double>(c.head_dim()))) {
  qkv = register_module("qkv", std::make_shared<DenseLinear>(c.dim, 3 * c.dim, c.qkv_bias));
  if (c.qk_norm) {
    q_norm = register_module("q_norm", layer_norm(c.head_dim()));
    k_norm = register_module("k_norm", layer_norm(c.head_dim()));
  }
  proj = register_module("proj", std::make_shared<DenseLinear>(c.dim, c.dim, true));
}

void AttentionImpl::set_linear(const std::string& name, std::shared_ptr<LinearLayer> layer) {
  TORCH_CHECK(name == "qkv" || name == "proj", "attention has no linear layer '", name, "'");
  (name == "qkv" ? qkv : proj) = replace_module(name, std::move(layer));
}

torch::Tensor AttentionImpl::forward(const torch::Tensor& x) {
  const int64_t B = x.size(0), N = x.size(1);
  // The local width may be D/tp under tensor parallelism: derive it from the qkv output.
  torch::Tensor qkv_out = qkv->forward(x);  // [B, N, 3 * H * hd]
  const int64_t local_width = qkv_out.size(2) / 3;
  const int64_t head_dim = local_width / heads;
  auto parts = qkv_out.view({B, N, 3, heads, head_dim}).permute({2, 0, 3, 1, 4});  // [3, B, H, N, hd]
  torch::Tensor q = parts[0], k = parts[1], v = parts[2];
  if (q_norm) {
    q = q_norm->forward(q);
    k = k_norm->forward(k);
  }
  torch::Tensor attn = torch::matmul(q * scale, k.transpose(-2, -1)).softmax(-1);  // [B, H, N, N]
  torch::Tensor out = torch::matmul(attn, v).transpose(1, 2).reshape({B, N, local_width});
  return proj->forward(out);
}

// --- Mlp -------------------------------------------------------------------------------

MlpImpl::MlpImpl(const ViTConfig& c) {
  fc1 = register_module("fc1", std::make_shared<DenseLinear>(c.dim, c.mlp_dim, true));
  fc2 = register_module("fc2", std::make_shared<DenseLinear>(c.mlp_dim, c.dim, true));
}

void MlpImpl::set_linear(const std::string& name, std::shared_ptr<LinearLayer> layer) {
  TORCH_CHECK(name == "fc1" || name == "fc2", "mlp has no linear layer '", name, "'");
  (name == "fc1" ? fc1 : fc2) = replace_module(name, std::move(layer));
}

torch::Tensor MlpImpl::forward(const torch::Tensor& x) { return fc2->forward(torch::gelu(fc1->forward(x))); }

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

torch::Tensor BlockImpl::forward(const torch::Tensor& x) {
  torch::Tensor a = attn->forward(norm1->forward(x));
  torch::Tensor h = x + (ls1_gamma.defined() ? a * ls1_gamma : a);
  torch::Tensor m = mlp->forward(norm2->forward(h));
  return h + (ls2_gamma.defined() ? m * ls2_gamma : m);
}

// --- PatchEmbed ------------------------------------------------------------------------

PatchEmbedImpl::PatchEmbedImpl(const ViTConfig& c) {
  proj = register_module(
      "proj", torch::nn::Conv2d(torch::nn::Conv2dOptions(c.in_chans, c.dim, c.patch_size).stride(c.patch_size)));
}

torch::Tensor PatchEmbedImpl::forward(const torch::Tensor& images) {
  return proj->forward(images).flatten(2).transpose(1, 2);  // [B, D, g, g] -> [B, g*g, D]
}

// --- VisionTransformer -----------------------------------------------------------------

VisionTransformerImpl::VisionTransformerImpl(const ViTConfig& c) : config(c) {
  config.validate();
  patch_embed = register_module("patch_embed", PatchEmbed(c));
  cls_token = register_parameter("cls_token", torch::zeros({1, 1, c.dim}));
  pos_embed = register_parameter("pos_embed", torch::zeros({1, c.num_tokens(), c.dim}));
  blocks = register_module("blocks", torch::nn::ModuleList());
  for (int64_t i = 0; i < c.depth; ++i) blocks->push_back(Block(c));
  if (c.global_pool == "avg") {
    fc_norm = register_module("fc_norm", layer_norm(c.dim));
  } else {
    norm = register_module("norm", layer_norm(c.dim));
  }
  if (c.num_classes > 0) head = register_module("head", std::make_shared<DenseLinear>(c.dim, c.num_classes, true));
  init_weights();
}

void VisionTransformerImpl::init_weights() {
  torch::NoGradGuard no_grad;
  trunc_normal_(pos_embed, 0.02);
  cls_token.normal_(0.0, 1e-6);
  patch_embed->proj->reset_parameters();  // PyTorch's default conv init, as timm keeps it
  for (size_t i = 0; i < blocks->size(); ++i) {
    Block b = block(i);
    reset_layer_norm(b->norm1);
    reset_layer_norm(b->norm2);
    reset_layer_norm(b->attn->q_norm);
    reset_layer_norm(b->attn->k_norm);
    init_linear(*b->attn->qkv);
    init_linear(*b->attn->proj);
    init_linear(*b->mlp->fc1);
    init_linear(*b->mlp->fc2);
    if (b->ls1_gamma.defined()) b->ls1_gamma.fill_(config.layer_scale);
    if (b->ls2_gamma.defined()) b->ls2_gamma.fill_(config.layer_scale);
  }
  reset_layer_norm(norm);
  reset_layer_norm(fc_norm);
  if (head) init_linear(*head);
}

torch::Tensor VisionTransformerImpl::embed(const torch::Tensor& images) {
  torch::Tensor x = patch_embed->forward(images);                      // [B, N, D]
  torch::Tensor cls = cls_token.expand({x.size(0), -1, -1});           // [B, 1, D]
  return torch::cat({cls, x}, 1) + pos_embed;                          // [B, N+1, D]
}

torch::Tensor VisionTransformerImpl::head_forward(const torch::Tensor& tokens) {
  torch::Tensor pooled;
  if (config.global_pool == "avg") {
    pooled = fc_norm->forward(tokens.slice(1, 1).mean(1));  // mean over patches, cls excluded
  } else {
    pooled = norm->forward(tokens.select(1, 0));  // cls token after norm (norm is per token)
  }
  return head ? head->forward(pooled) : pooled;
}

torch::Tensor VisionTransformerImpl::forward(const torch::Tensor& images) {
  torch::Tensor x = embed(images);
  for (size_t i = 0; i < blocks->size(); ++i) x = block(i)->forward(x);
  return head_forward(x);
}

}  // namespace shardtune
