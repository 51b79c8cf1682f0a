// Methods that train a subset of the backbone's own parameters, chosen by structure:
//   bitfit   every bias (patch embedding, qkv, proj, fc1, fc2, every LayerNorm)
//   ln_tune  every LayerNorm weight and bias
//   linear   nothing (the head alone, via peft.train_head)
//   full     everything (the full fine-tuning baseline)
//   none     nothing, head frozen too: the plain backbone for predict/eval
#include "peft/method.h"

namespace shardtune {

namespace {

enum class Pick { Biases, Norms, Nothing, Everything };

struct Selective : Method {
  explicit Selective(Pick p) : pick(p) {}
  ParamList inject(VisionTransformerImpl& model, const PeftConfig& cfg) const override {
    if (!cfg.targets.empty()) throw std::invalid_argument("peft.targets is not used by peft.method=" + cfg.method);
    ParamList owned;
    switch (pick) {
      case Pick::Nothing: break;
      case Pick::Everything:
        for (auto& p : model.parameters()) owned.push_back(p);
        break;
      case Pick::Biases:
        if (model.patch_embed) owned.push_back(model.patch_embed->proj->bias);  // first pipeline stage
        for (const Slot& s : slots(model)) {
          if (s.path == "head") continue;
          if (auto* d = dynamic_cast<DenseLinear*>(&s.get()); d && d->bias.defined()) owned.push_back(d->bias);
          if (auto* n = dynamic_cast<LayerNormOp*>(&s.get())) owned.push_back(n->bias);
        }
        break;
      case Pick::Norms:
        for (const Slot& s : slots(model))
          if (auto* n = dynamic_cast<LayerNormOp*>(&s.get())) {
            owned.push_back(n->weight);
            owned.push_back(n->bias);
          }
        break;
    }
    return owned;
  }
  Pick pick;
};

}  // namespace

void register_selective(MethodRegistry& r) {
  r.add("bitfit", std::make_unique<Selective>(Pick::Biases));
  r.add("ln_tune", std::make_unique<Selective>(Pick::Norms));
  r.add("linear", std::make_unique<Selective>(Pick::Nothing));
  r.add("full", std::make_unique<Selective>(Pick::Everything));
  r.add("none", std::make_unique<Selective>(Pick::Nothing));
}

}  // namespace shardtune
