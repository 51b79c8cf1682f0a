// Prefix tuning: L learnable key and value vectors per head prepended inside every
// attention: k, v [B, H, N, hd] -> [B, H, L + N, hd]. key, value [1, H, L, hd] ~
// trunc_normal(0.02), registered as blocks.{i}.attn.prefix.{key,value}. Under tensor
// parallelism every rank keeps all heads' prefixes and uses those of its own heads.
#include <stdexcept>

#include "peft/method.h"

namespace shardtune {

namespace {

struct KVPrefix : KVExtension {
  KVPrefix(const AttentionImpl& a, int64_t heads, int64_t len, int64_t head_dim) : attn(a) {
    key = register_parameter("key", torch::empty({1, heads, len, head_dim}));
    value = register_parameter("value", torch::empty({1, heads, len, head_dim}));
    trunc_normal_(key, 0.02);
    trunc_normal_(value, 0.02);
  }
  std::pair<torch::Tensor, torch::Tensor> extend(const torch::Tensor& k, const torch::Tensor& v) override {
    const int64_t B = k.size(0);
    return {torch::cat({cast_like(attn.local_heads(key, 1), k).expand({B, -1, -1, -1}), k}, 2),
            torch::cat({cast_like(attn.local_heads(value, 1), v).expand({B, -1, -1, -1}), v}, 2)};
  }
  const AttentionImpl& attn;  // the owner, for its heads
  torch::Tensor key, value;
};

struct Prefix : Method {
  ParamList inject(VisionTransformerImpl& model, const PeftConfig& cfg) const override {
    if (cfg.prompt_len <= 0)
      throw std::invalid_argument("peft.prompt_len=" + std::to_string(cfg.prompt_len) + " must be positive");
    if (!cfg.targets.empty()) throw std::invalid_argument("peft.targets is not used by peft.method=prefix");
    ParamList owned;
    for (size_t i = 0; i < model.num_blocks(); ++i) {
      auto& attn = model.block(i)->attn;
      seed_peft_init("blocks." + std::to_string(model.block_index(i)) + ".attn.prefix");
      auto p = std::make_shared<KVPrefix>(*attn, model.config.heads, cfg.prompt_len, model.config.head_dim());
      attn->kv_extension = attn->register_module("prefix", p);
      owned.push_back(p->key);
      owned.push_back(p->value);
    }
    return owned;
  }
};

}  // namespace

void register_prefix(MethodRegistry& r) { r.add("prefix", std::make_unique<Prefix>()); }

}  // namespace shardtune
