#include "peft/peft_count.h"

#include <stdexcept>

namespace shardtune {

int64_t peft_param_count(const ViTConfig& m, const PeftConfig& p) {
  const int64_t D = m.dim, M = m.mlp_dim, L = m.depth, hd = m.head_dim();
  const std::string& k = p.method;
  if (!p.targets.empty() && (k == "lora" || k == "ssf" || k == "fact_tt"))
    throw std::invalid_argument("the closed form of peft.method=" + k + " covers the default targets only");
  if (k == "lora") {
    const int64_t parts = static_cast<int64_t>(split_list(p.qkv_parts).size());
    return L * parts * (p.rank * D + D * p.rank);
  }
  if (k == "adapter") return L * 2 * (D * p.bottleneck + p.bottleneck + p.bottleneck * D + D);
  if (k == "adaptformer") return L * (D * p.bottleneck + p.bottleneck + p.bottleneck * D + D);
  if (k == "vpt_shallow") return p.prompt_len * D;
  if (k == "vpt_deep") return L * p.prompt_len * D;
  if (k == "prefix") return L * 2 * p.prompt_len * D;
  if (k == "bitfit") {  // patch embedding, qkv, proj, fc1, fc2 and every LayerNorm bias
    const int64_t per_block = (m.qkv_bias ? 3 * D : 0) + D + M + D + 2 * D + (m.qk_norm ? 2 * hd : 0);
    return D + L * per_block + D;
  }
  if (k == "ln_tune") return L * (4 * D + (m.qk_norm ? 4 * hd : 0)) + 2 * D;
  if (k == "ssf") {  // scale + shift after qkv, proj, fc1, fc2 and every LayerNorm (q/k norms too)
    const int64_t per_block = 2 * (3 * D + D + M + D) + 2 * (2 * D) + (m.qk_norm ? 2 * 2 * hd : 0);
    return L * per_block + 2 * D;
  }
  if (k == "fact_tt") {
    if (M % D != 0) throw std::invalid_argument("peft.method=fact_tt needs model.mlp_dim a multiple of model.dim");
    const int64_t pieces = L * (3 + 1 + 2 * (M / D));
    return 2 * D * p.rank + pieces * p.rank * p.rank;
  }
  if (k == "lst") {
    const ViTConfig s = side_config(m, p);
    const int64_t w = s.dim;
    const int64_t ladder = D * w + w + 1 + s.block_param_count();  // down, gate, side block
    const int64_t in = D * w + w, out = 2 * w + w * D + D;
    return in + static_cast<int64_t>(side_block_set(p, L).size()) * ladder + out;
  }
  if (k == "linear" || k == "none") return 0;
  if (k == "full") return m.param_count() - (m.num_classes > 0 ? D * m.num_classes + m.num_classes : 0);
  throw std::invalid_argument("peft.method=" + k + " is not a known method");
}

int64_t trainable_param_count(const ViTConfig& m, const PeftConfig& p) {
  const bool head = p.method != "none" && p.train_head && m.num_classes > 0;
  return peft_param_count(m, p) + (head ? m.dim * m.num_classes + m.num_classes : 0);
}

}  // namespace shardtune
