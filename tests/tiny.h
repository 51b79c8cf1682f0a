// Tiny ViTs for tests (DESIGN.md: dim 32-64, depth 2-4, image 28, patch 7).
#pragma once

#include <torch/torch.h>

#include <string>
#include <vector>

#include "models/vit.h"
#include "models/vit_config.h"

namespace shardtune {

inline ViTConfig tiny_config() {
  ViTConfig c;
  c.arch = "vit";
  c.image_size = 28;
  c.patch_size = 7;
  c.in_chans = 1;
  c.dim = 32;
  c.depth = 2;
  c.heads = 4;
  c.mlp_dim = 64;
  c.num_classes = 5;
  return c;
}

// One variant per model option, so every code path meets the reference.
inline std::vector<ViTConfig> tiny_variants() {
  std::vector<ViTConfig> v;
  v.push_back(tiny_config());
  ViTConfig avg = tiny_config();
  avg.global_pool = "avg";
  v.push_back(avg);
  ViTConfig nobias = tiny_config();
  nobias.qkv_bias = false;
  nobias.in_chans = 3;
  v.push_back(nobias);
  ViTConfig ls = tiny_config();
  ls.layer_scale = 0.5;
  ls.qk_norm = true;
  v.push_back(ls);
  return v;
}

inline std::string describe(const ViTConfig& c) {
  return c.global_pool + (c.qkv_bias ? "" : "_noqkvbias") + (c.layer_scale > 0 ? "_layerscale" : "") +
         (c.qk_norm ? "_qknorm" : "") + "_c" + std::to_string(c.in_chans);
}

}  // namespace shardtune

namespace shardtune {
inline void PrintTo(const ViTConfig& c, std::ostream* os) { *os << describe(c); }

// Replaces every parameter by N(0, 0.3) noise (+1 for norm weights and layer scales) so
// no term of the forward pass hides behind a zero or a one.
inline void randomize_for_test(torch::nn::Module& m) {
  torch::NoGradGuard no_grad;
  for (auto& p : m.named_parameters()) {
    const std::string& k = p.key();
    bool scale_like = (k.find("norm") != std::string::npos && k.find(".weight") != std::string::npos) ||
                      k.find("gamma") != std::string::npos;
    p.value().normal_(scale_like ? 1.0 : 0.0, 0.3);
  }
}

using ops::FrozenGemm;

// CPU operators with one fixed frozen-GEMM path (nothing measured, no cache), taken down to
// GEMMs of `min_macs` multiply-adds (0: all), the AVX-512 kernels on or off (for fp32 only
// with `fp32_kernels`).
inline std::shared_ptr<const ops::Ops> cpu_ops(FrozenGemm path, int64_t min_macs = ops::kMinTunedMacs,
                                               bool kernels = true, bool fp32_kernels = false) {
  ops::CpuOptions o;
  o.frozen_gemm = path;
  o.min_macs = min_macs;
  o.bf16_kernels = kernels;
  o.fp32_kernels = fp32_kernels;
  o.cache_dir = "-";
  return ops::make_cpu_ops(o);
}

// ||a - b|| / ||b||
inline double rel_err(const torch::Tensor& a, const torch::Tensor& b) {
  return (a - b).norm().item<double>() / (b.norm().item<double>() + 1e-30);
}

}  // namespace shardtune
