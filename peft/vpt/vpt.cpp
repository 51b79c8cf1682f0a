// Visual prompt tuning (Jia et al.). Prompts P [1, L, D] ~ U(+-sqrt(6 / (C P^2 + D))).
//   vpt_shallow: before block 0, [cls, patches] -> [cls, P, patches].
//   vpt_deep:    as shallow at block 0; before every later block i the L prompt outputs
//                of block i-1 are replaced by that block's own P_i.
// Registered as blocks.{i}.vpt.prompt. Avg pooling skips the prompts (num_prefix_tokens).
#include <cmath>
#include <stdexcept>

#include "peft/method.h"

namespace shardtune {

namespace {

struct Prompts : Op {
  Prompts(int64_t len, int64_t dim, double bound, bool insert) : insert_(insert) {
    prompt = register_parameter("prompt", torch::empty({1, len, dim}));
    torch::NoGradGuard g;
    prompt.uniform_(-bound, bound);
  }
  // x: [B, 1 + N, D] (insert) or [B, 1 + L + N, D] (replace)
  torch::Tensor forward(const torch::Tensor& x) override {
    const int64_t L = prompt.size(1);
    torch::Tensor p = cast_like(prompt, x).expand({x.size(0), L, prompt.size(2)});
    torch::Tensor rest = insert_ ? x.slice(1, 1) : x.slice(1, 1 + L);
    return torch::cat({x.slice(1, 0, 1), p, rest}, 1);
  }
  bool insert_;
  torch::Tensor prompt;
};

struct Vpt : Method {
  explicit Vpt(bool deep) : deep_(deep) {}
  ParamList inject(VisionTransformerImpl& model, const PeftConfig& cfg) const override {
    if (cfg.prompt_len <= 0)
      throw std::invalid_argument("peft.prompt_len=" + std::to_string(cfg.prompt_len) + " must be positive");
    if (!cfg.targets.empty()) throw std::invalid_argument("peft.targets is not used by VPT");
    const auto& c = model.config;
    const double bound = std::sqrt(6.0 / static_cast<double>(c.in_chans * c.patch_size * c.patch_size + c.dim));
    ParamList owned;
    for (size_t i = 0; i < model.num_blocks(); ++i) {
      const int64_t global = model.block_index(i);  // a pipeline stage may start later
      if (!deep_ && global > 0) break;
      auto block = model.block(i);
      seed_peft_init("blocks." + std::to_string(global) + ".vpt");
      auto p = std::make_shared<Prompts>(cfg.prompt_len, c.dim, bound, /*insert=*/global == 0);
      block->pre = block->register_module("vpt", p);
      owned.push_back(p->prompt);
    }
    model.num_prefix_tokens += cfg.prompt_len;
    return owned;
  }
  bool deep_;
};

}  // namespace

void register_vpt(MethodRegistry& r) {
  r.add("vpt_shallow", std::make_unique<Vpt>(false));
  r.add("vpt_deep", std::make_unique<Vpt>(true));
}

}  // namespace shardtune
