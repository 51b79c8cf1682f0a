// AdaptFormer (Chen et al.): a bottleneck beside each block's MLP, fed the block's
// residual stream h: out = h + mlp(norm2(h)) + scale * up(relu(down(h))). up = 0 at
// start, so step 0 equals the base model. Registered as blocks.{i}.adaptmlp.{down,up}.
#include <stdexcept>

#include "peft/method.h"

namespace shardtune {

namespace {

struct ParallelAdapter : Op {
  ParallelAdapter(int64_t dim, int64_t bottleneck, double s) : scale(s) {
    b = make_bottleneck(*this, "down", "up", dim, bottleneck);
  }
  torch::Tensor forward(const torch::Tensor& h) override { return b.up->forward(torch::relu(b.down->forward(h))) * scale; }
  double scale;
  Bottleneck b;
};

struct AdaptFormer : Method {
  ParamList inject(VisionTransformerImpl& model, const PeftConfig& cfg) const override {
    if (!cfg.targets.empty()) throw std::invalid_argument("peft.targets is not used by peft.method=adaptformer");
    ParamList owned;
    for (size_t i = 0; i < model.num_blocks(); ++i) {
      auto block = model.block(i);
      seed_peft_init("blocks." + std::to_string(model.block_index(i)) + ".adaptmlp");
      auto a = std::make_shared<ParallelAdapter>(model.config.dim, cfg.bottleneck, cfg.scale_or(0.1));
      block->mlp_side = block->register_module("adaptmlp", a);
      for (auto& p : a->b.params()) owned.push_back(p);
    }
    return owned;
  }
};

}  // namespace

void register_adaptformer(MethodRegistry& r) { r.add("adaptformer", std::make_unique<AdaptFormer>()); }

}  // namespace shardtune
