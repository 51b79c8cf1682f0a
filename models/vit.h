// The Vision Transformer, defined once, unsharded, with timm's module and parameter names
// (patch_embed.proj, cls_token, pos_embed, blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,
// mlp.fc1,mlp.fc2,ls1.gamma,ls2.gamma}, norm, fc_norm, head), so a timm state_dict loads
// unchanged. It knows nothing of parallelism or PEFT: both replace its Linear layers
// afterwards through slots (see Op and Slot).
#pragma once

#include <torch/torch.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "models/vit_config.h"

namespace shardtune {

// --- Replaceable layers -------------------------------------------------------------
// Every projection and LayerNorm is called through `Op`, so that tensor parallelism
// (column/row-parallel linears) and PEFT (LoRA/SSF wrapping the base layer, adapters, ...)
// can swap implementations after construction without the model knowing (see Slot).
struct Op : torch::nn::Module {
  virtual torch::Tensor forward(const torch::Tensor& x) = 0;
};

// y = x W^T + b: weight [out, in], optional bias [out].
struct DenseLinear : Op {
  DenseLinear(int64_t in_features, int64_t out_features, bool with_bias);
  torch::Tensor forward(const torch::Tensor& x) override;

  torch::Tensor weight;
  torch::Tensor bias;  // undefined without bias
};

// LayerNorm over the last dim, eps 1e-6 (timm's ViT): weight [D], bias [D].
struct LayerNormOp : Op {
  explicit LayerNormOp(int64_t width);
  torch::Tensor forward(const torch::Tensor& x) override;

  int64_t width;
  torch::Tensor weight, bias;
};

// Extends attention keys and values (prefix tuning): k, v [B, H, N, hd] -> [B, H, L+N, hd].
struct KVExtension : torch::nn::Module {
  virtual std::pair<torch::Tensor, torch::Tensor> extend(const torch::Tensor& k, const torch::Tensor& v) = 0;
};

// --- Attention ------------------------------------------------------------------------
// x: [B, N, D] -> qkv: [B, N, 3D] with rows q, k, v (heads contiguous inside each)
// -> softmax(q k^T * head_dim^-0.5) v -> proj.
struct AttentionImpl : torch::nn::Module {
  explicit AttentionImpl(const ViTConfig& c);
  torch::Tensor forward(const torch::Tensor& x);

  int64_t heads;  // local heads: heads / tp under tensor parallelism
  double scale;
  std::shared_ptr<Op> qkv, proj;
  std::shared_ptr<Op> q_norm, k_norm;  // only with qk_norm
  std::shared_ptr<KVExtension> kv_extension;  // optional, e.g. prefix tuning
};
TORCH_MODULE(Attention);

// --- MLP ----------------------------------------------------------------------------
// fc1 [M, D] -> exact (erf) GELU -> fc2 [D, M].
struct MlpImpl : torch::nn::Module {
  explicit MlpImpl(const ViTConfig& c);
  torch::Tensor forward(const torch::Tensor& x);

  std::shared_ptr<Op> fc1, fc2;
};
TORCH_MODULE(Mlp);

// --- Block --------------------------------------------------------------------------
// Pre-norm residual block: x = pre(x); h = x + ls1(attn(norm1(x)));
// out = h + ls2(mlp(norm2(h)) + mlp_side(h)). `pre` and `mlp_side` are optional extension
// points (VPT prompts, AdaptFormer) that PEFT fills in.
struct BlockImpl : torch::nn::Module {
  explicit BlockImpl(const ViTConfig& c);
  torch::Tensor forward(const torch::Tensor& x);

  std::shared_ptr<Op> norm1, norm2;
  Attention attn{nullptr};
  Mlp mlp{nullptr};
  torch::Tensor ls1_gamma, ls2_gamma;  // [D], registered as ls1.gamma / ls2.gamma with layer_scale
  std::shared_ptr<Op> pre;       // tokens -> tokens before the block
  std::shared_ptr<Op> mlp_side;  // a branch beside the MLP, fed the block's residual stream
};
TORCH_MODULE(Block);

// --- Patch embedding ---------------------------------------------------------------------
// A conv with kernel = stride = patch: [B, C, H, W] -> [B, D, H/P, W/P] -> tokens [B, N, D].
struct PatchEmbedImpl : torch::nn::Module {
  explicit PatchEmbedImpl(const ViTConfig& c);
  torch::Tensor forward(const torch::Tensor& images);

  int64_t patch;
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
  std::shared_ptr<Op> norm;     // global_pool = token
  std::shared_ptr<Op> fc_norm;  // global_pool = avg
  std::shared_ptr<Op> head;     // absent when num_classes = 0
  int64_t num_prefix_tokens = 1;  // cls (+ prompts a PEFT method inserts); avg pooling skips them

  Block block(size_t i) const { return Block(blocks->ptr<BlockImpl>(i)); }
};
TORCH_MODULE(VisionTransformer);

// A replaceable layer: its module path and the member that holds it. Replacing through a
// slot keeps the registered name, so parameter paths stay timm's.
struct Slot {
  enum class Kind { Linear, Norm };
  std::string path;              // "blocks.0.attn.qkv", "norm", "head"
  Kind kind;
  torch::nn::Module* owner;      // the module that registered it
  std::string name;              // its name inside owner
  std::shared_ptr<Op>* member;   // the owner's field

  Op& get() const { return **member; }
  void replace(std::shared_ptr<Op> op) const;
};

// Every Linear (patch embedding excluded) and LayerNorm of the model, in forward order.
std::vector<Slot> slots(VisionTransformerImpl& model);

// `t` in the dtype of `like` (undefined stays undefined): how every layer uses its
// parameters, so bf16 compute works with fp32 trainable parameters.
inline torch::Tensor cast_like(const torch::Tensor& t, const torch::Tensor& like) {
  return t.defined() ? t.to(like.scalar_type()) : t;
}

// Fills `t` in place from N(0, std) truncated to [-2 std, 2 std] (PyTorch's algorithm).
void trunc_normal_(torch::Tensor t, double std);

}  // namespace shardtune
