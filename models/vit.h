// The Vision Transformer, defined once, unsharded, with timm's module and parameter names
// (patch_embed.proj, cls_token, pos_embed, blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,
// mlp.fc1,mlp.fc2,ls1.gamma,ls2.gamma}, norm, fc_norm, head), so a timm state_dict loads
// unchanged. It knows nothing of parallelism or PEFT: both replace its Linear layers
// afterwards through Linear slots (see LinearLayer).
#pragma once

#include <torch/torch.h>

#include <memory>
#include <string>

#include "models/vit_config.h"

namespace shardtune {

// --- Linear layers -------------------------------------------------------------------
// y = x W^T + b. Blocks call their projections through this interface so that tensor
// parallelism (column/row-parallel) and PEFT (LoRA wrapping the base layer) can swap
// the implementation after construction without the model knowing.
struct LinearLayer : torch::nn::Module {
  virtual torch::Tensor forward(const torch::Tensor& x) = 0;
};

// The plain layer: weight [out, in], optional bias [out].
struct DenseLinear : LinearLayer {
  DenseLinear(int64_t in_features, int64_t out_features, bool with_bias);
  torch::Tensor forward(const torch::Tensor& x) override;

  torch::Tensor weight;
  torch::Tensor bias;  // undefined without bias
};

// --- Attention ------------------------------------------------------------------------
// x: [B, N, D] -> qkv: [B, N, 3D] with rows q, k, v (heads contiguous inside each)
// -> softmax(q k^T * head_dim^-0.5) v -> proj.
struct AttentionImpl : torch::nn::Module {
  explicit AttentionImpl(const ViTConfig& c);
  torch::Tensor forward(const torch::Tensor& x);

  // Replaces a projection ("qkv" or "proj"), keeping the registered name.
  void set_linear(const std::string& name, std::shared_ptr<LinearLayer> layer);

  int64_t heads;
  double scale;
  std::shared_ptr<LinearLayer> qkv, proj;
  torch::nn::LayerNorm q_norm{nullptr}, k_norm{nullptr};  // only with qk_norm
};
TORCH_MODULE(Attention);

// --- MLP ----------------------------------------------------------------------------
// fc1 [M, D] -> exact (erf) GELU -> fc2 [D, M].
struct MlpImpl : torch::nn::Module {
  explicit MlpImpl(const ViTConfig& c);
  torch::Tensor forward(const torch::Tensor& x);
  void set_linear(const std::string& name, std::shared_ptr<LinearLayer> layer);

  std::shared_ptr<LinearLayer> fc1, fc2;
};
TORCH_MODULE(Mlp);

// --- Block --------------------------------------------------------------------------
// Pre-norm residual block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))).
struct BlockImpl : torch::nn::Module {
  explicit BlockImpl(const ViTConfig& c);
  torch::Tensor forward(const torch::Tensor& x);

  torch::nn::LayerNorm norm1{nullptr}, norm2{nullptr};
  Attention attn{nullptr};
  Mlp mlp{nullptr};
  torch::Tensor ls1_gamma, ls2_gamma;  // [D], registered as ls1.gamma / ls2.gamma with layer_scale
};
TORCH_MODULE(Block);

// --- Patch embedding ---------------------------------------------------------------------
// A conv with kernel = stride = patch: [B, C, H, W] -> [B, D, H/P, W/P] -> tokens [B, N, D].
struct PatchEmbedImpl : torch::nn::Module {
  explicit PatchEmbedImpl(const ViTConfig& c);
  torch::Tensor forward(const torch::Tensor& images);

  torch::nn::Conv2d proj{nullptr};
};
TORCH_MODULE(PatchEmbed);

// --- VisionTransformer ------------------------------------------------------------------
struct VisionTransformerImpl : torch::nn::Module {
  explicit VisionTransformerImpl(const ViTConfig& c);

  // images: [B, C, H, W] -> logits [B, num_classes] (pooled features [B, D] when num_classes = 0)
  torch::Tensor forward(const torch::Tensor& images);

  // The three parts of forward, for pipeline stages:
  torch::Tensor embed(const torch::Tensor& images);  // -> tokens [B, N+1, D], cls first
  torch::Tensor head_forward(const torch::Tensor& tokens);  // tokens [B, N+1, D] -> logits

  // timm's default init ('' mode): trunc_normal(0.02) Linear weights and pos_embed,
  // normal(1e-6) cls_token, zero biases, LayerNorm ones/zeros, conv PyTorch default.
  // Deterministic given torch's global seed.
  void init_weights();

  ViTConfig config;
  PatchEmbed patch_embed{nullptr};
  torch::Tensor cls_token;                      // [1, 1, D]
  torch::Tensor pos_embed;                      // [1, N+1, D]
  torch::nn::ModuleList blocks{nullptr};
  torch::nn::LayerNorm norm{nullptr};     // global_pool = token
  torch::nn::LayerNorm fc_norm{nullptr};  // global_pool = avg
  std::shared_ptr<LinearLayer> head;      // absent when num_classes = 0

  Block block(size_t i) const { return Block(blocks->ptr<BlockImpl>(i)); }
};
TORCH_MODULE(VisionTransformer);

// Fills `t` in place from N(0, std) truncated to [-2 std, 2 std] (PyTorch's algorithm).
void trunc_normal_(torch::Tensor t, double std);

}  // namespace shardtune
