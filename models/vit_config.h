// The shape of a Vision Transformer, as timm builds it. Torch-free, so planning and
// validation never pay for LibTorch.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace shardtune {

struct ViTConfig {
  std::string arch = "vit";        // preset name it came from, or "vit" for explicit dims
  int64_t image_size = 224;        // square input, pixels
  int64_t patch_size = 16;         // square patches, stride = size
  int64_t in_chans = 3;
  int64_t dim = 768;               // token width D
  int64_t depth = 12;              // number of blocks
  int64_t heads = 12;              // attention heads; head_dim = D / heads
  int64_t mlp_dim = 3072;          // MLP hidden width M
  int64_t num_classes = 1000;      // 0: no head, the model returns pooled features
  bool qkv_bias = true;
  std::string global_pool = "token";  // token: cls after norm; avg: mean of patches, then fc_norm
  double layer_scale = 0.0;        // > 0: ls1/ls2 gammas exist, initialised to this value
  bool qk_norm = false;            // LayerNorm over head_dim on q and k (attn.q_norm, attn.k_norm)

  int64_t grid() const { return image_size / patch_size; }
  int64_t num_patches() const { return grid() * grid(); }
  int64_t num_tokens() const { return num_patches() + 1; }  // + cls token
  int64_t head_dim() const { return dim / heads; }

  // Throws std::invalid_argument naming the key ("model.heads=5 does not divide model.dim=64").
  void validate() const;

  // Parameter count in closed form, equal to timm's for the same configuration.
  int64_t param_count() const;
  int64_t block_param_count() const;

  // Every parameter of the timm model this config builds: (name, shape), in registration
  // order. Lets a checkpoint be checked against the config from its header alone.
  std::vector<std::pair<std::string, std::vector<int64_t>>> parameter_shapes() const;

  // Forward FLOPs for one image (a multiply-add = 2 FLOPs): patch embedding + blocks + head.
  double forward_flops_per_image() const;
  double block_forward_flops_per_image() const;  // one block's share of it
};

// A timm preset by name (vit_base_patch16_224, ..., vit_22b_patch14_224 alias vit_22b).
// Throws std::invalid_argument listing the known names when `arch` is none of them.
ViTConfig vit_preset(const std::string& arch);
std::vector<std::string> vit_preset_names();

}  // namespace shardtune
