// Houlsby adapters: a bottleneck in series after the attention output (attn.proj) and after
// the MLP output (mlp.fc2) of every block: y + up(gelu(down(y))). down [b, D] + bias,
// up [D, b] + bias with up = 0, so step 0 equals the base model.
#include <stdexcept>

#include "peft/method.h"

namespace shardtune {

namespace {

struct SeriesAdapter : Op {
  SeriesAdapter(std::shared_ptr<Op> base_op, int64_t bottleneck) {
    base = register_module("base_layer", std::move(base_op));
    const int64_t d = out_features(*base);
    down = register_module("adapter_down", std::make_shared<DenseLinear>(d, bottleneck, true));
    up = register_module("adapter_up", std::make_shared<DenseLinear>(bottleneck, d, true));
    kaiming_uniform_linear_(down->weight);
    torch::NoGradGuard g;
    down->bias.zero_();
    up->weight.zero_();
    up->bias.zero_();
  }
  torch::Tensor forward(const torch::Tensor& x) override {
    torch::Tensor y = base->forward(x);
    return y + up->forward(torch::gelu(down->forward(y)));
  }
  std::shared_ptr<Op> base;
  std::shared_ptr<DenseLinear> down, up;
};

struct Adapter : Method {
  ParamList inject(VisionTransformerImpl& model, const PeftConfig& cfg) const override {
    if (cfg.bottleneck <= 0)
      throw std::invalid_argument("peft.bottleneck=" + std::to_string(cfg.bottleneck) + " must be positive");
    if (!cfg.targets.empty()) throw std::invalid_argument("peft.targets is not used by peft.method=adapter");
    ParamList owned;
    for (const Slot& s : slots(model)) {
      if (s.name != "proj" && s.name != "fc2") continue;
      auto a = std::make_shared<SeriesAdapter>(*s.member, cfg.bottleneck);
      for (auto& p : {a->down->weight, a->down->bias, a->up->weight, a->up->bias}) owned.push_back(p);
      s.replace(a);
    }
    return owned;
  }
};

}  // namespace

void register_adapter(MethodRegistry& r) { r.add("adapter", std::make_unique<Adapter>()); }

}  // namespace shardtune
