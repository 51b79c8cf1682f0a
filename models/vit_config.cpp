#include "models/vit_config.h"

#include <stdexcept>

namespace shardtune {

namespace {

struct Preset {
  const char* name;
  int64_t dim, depth, heads, mlp_dim, patch_size;
  bool qkv_bias, qk_norm;
};

// Dimensions from timm (REFERENCE.md). ViT-22B: no qkv bias, QK-norm.
constexpr Preset kPresets[] = {
    {"vit_tiny_patch16_224", 192, 12, 3, 768, 16, true, false},
    {"vit_small_patch16_224", 384, 12, 6, 1536, 16, true, false},
    {"vit_base_patch16_224", 768, 12, 12, 3072, 16, true, false},
    {"vit_large_patch16_224", 1024, 24, 16, 4096, 16, true, false},
    {"vit_huge_patch14_224", 1280, 32, 16, 5120, 14, true, false},
    {"vit_giant_patch14_224", 1408, 40, 16, 6144, 14, true, false},
    {"vit_gigantic_patch14_224", 1664, 48, 16, 8192, 14, true, false},
    {"vit_e_patch14_224", 1792, 56, 16, 15360, 14, true, false},
    {"vit_22b_patch14_224", 6144, 48, 48, 24576, 14, false, true},
};

void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

std::string kv(const char* key, int64_t v) { return std::string("model.") + key + "=" + std::to_string(v); }

}  // namespace

ViTConfig vit_preset(const std::string& arch) {
  std::string name = arch == "vit_22b" ? "vit_22b_patch14_224" : arch;
  for (const auto& p : kPresets) {
    if (name != p.name) continue;
    ViTConfig c;
    c.arch = arch;
    c.dim = p.dim;
    c.depth = p.depth;
    c.heads = p.heads;
    c.mlp_dim = p.mlp_dim;
    c.patch_size = p.patch_size;
    c.qkv_bias = p.qkv_bias;
    c.qk_norm = p.qk_norm;
    return c;
  }
  std::string known = "vit";
  for (const auto& n : vit_preset_names()) known += ", " + n;
  throw std::invalid_argument("model.arch=" + arch + " is not a known architecture (known: " + known + ")");
}

std::vector<std::string> vit_preset_names() {
  std::vector<std::string> names;
  for (const auto& p : kPresets) names.emplace_back(p.name);
  names.emplace_back("vit_22b");
  return names;
}

void ViTConfig::validate() const {
  require(image_size > 0, kv("image_size", image_size) + " must be positive");
  require(patch_size > 0, kv("patch_size", patch_size) + " must be positive");
  require(image_size % patch_size == 0,
          kv("patch_size", patch_size) + " does not divide " + kv("image_size", image_size));
  require(in_chans > 0, kv("in_chans", in_chans) + " must be positive");
  require(dim > 0, kv("dim", dim) + " must be positive");
  require(depth > 0, kv("depth", depth) + " must be positive");
  require(heads > 0, kv("heads", heads) + " must be positive");
  require(dim % heads == 0, kv("heads", heads) + " does not divide " + kv("dim", dim));
  require(mlp_dim > 0, kv("mlp_dim", mlp_dim) + " must be positive");
  require(num_classes >= 0, kv("num_classes", num_classes) + " must be >= 0");
  require(global_pool == "token" || global_pool == "avg",
          "model.global_pool=" + global_pool + " must be token or avg");
  require(layer_scale >= 0, "model.layer_scale=" + std::to_string(layer_scale) + " must be >= 0 (0 = off)");
}

int64_t ViTConfig::block_param_count() const {
  const int64_t D = dim, M = mlp_dim;
  int64_t n = 2 * D;                          // norm1
  n += 3 * D * D + (qkv_bias ? 3 * D : 0);    // attn.qkv
  n += qk_norm ? 4 * head_dim() : 0;          // attn.q_norm, attn.k_norm
  n += D * D + D;                             // attn.proj
  n += 2 * D;                                 // norm2
  n += D * M + M + M * D + D;                 // mlp.fc1, mlp.fc2
  n += layer_scale > 0 ? 2 * D : 0;           // ls1, ls2
  return n;
}

int64_t ViTConfig::param_count() const {
  const int64_t D = dim;
  int64_t n = D * in_chans * patch_size * patch_size + D;  // patch_embed.proj
  n += D + num_tokens() * D;                               // cls_token, pos_embed
  n += depth * block_param_count();
  n += 2 * D;                                              // norm (token) or fc_norm (avg)
  n += num_classes > 0 ? D * num_classes + num_classes : 0;
  return n;
}

std::vector<std::pair<std::string, std::vector<int64_t>>> ViTConfig::parameter_shapes() const {
  const int64_t D = dim, M = mlp_dim;
  std::vector<std::pair<std::string, std::vector<int64_t>>> s;
  s.push_back({"cls_token", {1, 1, D}});
  s.push_back({"pos_embed", {1, num_tokens(), D}});
  s.push_back({"patch_embed.proj.weight", {D, in_chans, patch_size, patch_size}});
  s.push_back({"patch_embed.proj.bias", {D}});
  for (int64_t i = 0; i < depth; ++i) {
    const std::string b = "blocks." + std::to_string(i) + ".";
    s.push_back({b + "norm1.weight", {D}});
    s.push_back({b + "norm1.bias", {D}});
    s.push_back({b + "attn.qkv.weight", {3 * D, D}});
    if (qkv_bias) s.push_back({b + "attn.qkv.bias", {3 * D}});
    if (qk_norm)
      for (const char* n : {"attn.q_norm.weight", "attn.q_norm.bias", "attn.k_norm.weight", "attn.k_norm.bias"})
        s.push_back({b + n, {head_dim()}});
    s.push_back({b + "attn.proj.weight", {D, D}});
    s.push_back({b + "attn.proj.bias", {D}});
    if (layer_scale > 0) s.push_back({b + "ls1.gamma", {D}});
    s.push_back({b + "norm2.weight", {D}});
    s.push_back({b + "norm2.bias", {D}});
    s.push_back({b + "mlp.fc1.weight", {M, D}});
    s.push_back({b + "mlp.fc1.bias", {M}});
    s.push_back({b + "mlp.fc2.weight", {D, M}});
    s.push_back({b + "mlp.fc2.bias", {D}});
    if (layer_scale > 0) s.push_back({b + "ls2.gamma", {D}});
  }
  const std::string top = global_pool == "avg" ? "fc_norm" : "norm";
  s.push_back({top + ".weight", {D}});
  s.push_back({top + ".bias", {D}});
  if (num_classes > 0) {
    s.push_back({"head.weight", {num_classes, D}});
    s.push_back({"head.bias", {num_classes}});
  }
  return s;
}

double ViTConfig::block_forward_flops_per_image() const {
  const double N = static_cast<double>(num_tokens()), D = static_cast<double>(dim),
               M = static_cast<double>(mlp_dim);
  return 8 * N * D * D + 4 * N * D * M + 4 * N * N * D;
}

double ViTConfig::forward_flops_per_image() const {
  const double D = static_cast<double>(dim);
  double patch = 2.0 * num_patches() * (in_chans * patch_size * patch_size) * D;
  double head = 2.0 * D * num_classes;
  return patch + depth * block_forward_flops_per_image() + head;
}

}  // namespace shardtune
