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
    b = make_bottleneck(*this, "adapter_down", "adapter_up", out_features(*base), bottleneck);
  }
  torch::Tensor forward(const torch::Tensor& x) override {
    torch::Tensor y = base->forward(x);
    return y + b.up->forward(torch::gelu(b.down->forward(y)));
  }
  std::shared_ptr<Op> base;
  Bottleneck b;
};

struct Adapter : Method {
  ParamList inject(VisionTransformerImpl& model, const PeftConfig& cfg) const override {
    if (!cfg.targets.empty()) throw std::invalid_argument("peft.targets is not used by peft.method=adapter");
    ParamList owned;
    for (const Slot& s : slots(model)) {
      if (s.name != "proj" && s.name != "fc2") continue;
      seed_peft_init(s.path);
      auto a = std::make_shared<SeriesAdapter>(*s.member, cfg.bottleneck);
      for (auto& p : a->b.params()) owned.push_back(p);
      s.replace(a);
    }
    return owned;
  }
};

}  // namespace

void register_adapter(MethodRegistry& r) { r.add("adapter", std::make_unique<Adapter>()); }

}  // namespace shardtune
