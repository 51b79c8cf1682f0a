// SSF (Lian et al.): per-channel scale (init 1) and shift (init 0) after an op:
// y = base(x) * ssf_scale + ssf_shift. Default: after every block linear (qkv, proj, fc1,
// fc2) and every LayerNorm. Mergeable: a Linear becomes (diag(s) W, s b + t), a
// LayerNorm (s w, s b + t).
#include <stdexcept>

#include "peft/method.h"

namespace shardtune {

namespace {

struct SsfOp : Op, Mergeable {
  SsfOp(std::shared_ptr<Op> base_op, std::string path) : path_(std::move(path)) {
    base = register_module("base_layer", std::move(base_op));
    const int64_t d = out_features(*base);
    scale = register_parameter("ssf_scale", torch::ones({d}));
    shift = register_parameter("ssf_shift", torch::zeros({d}));
  }
  torch::Tensor forward(const torch::Tensor& x) override {
    torch::Tensor y = base->forward(x);
    // Under tensor parallelism the output may hold only this rank's channels.
    return merged ? y : torch::addcmul(cast_like(base->output_param(shift), y), y, cast_like(base->output_param(scale), y));
  }
  // (weight, bias) of the base layer; weight rows are output channels.
  std::pair<torch::Tensor, torch::Tensor> base_params() {
    if (auto* d = dynamic_cast<DenseLinear*>(base.get())) {
      if (!d->bias.defined())
        throw std::invalid_argument("SSF on " + path_ + " cannot merge: the layer has no bias to absorb the shift");
      return {d->weight, d->bias};
    }
    auto& n = dynamic_cast<LayerNormOp&>(*base);
    return {n.weight, n.bias};
  }
  // The scale of the weight rows this rank holds (a sharded weight keeps its full bias).
  torch::Tensor row_scale(const torch::Tensor& w) {
    auto* d = dynamic_cast<DenseLinear*>(base.get());
    torch::Tensor s = d ? d->out_rows(scale) : scale;
    return w.dim() == 2 ? s.unsqueeze(1) : s;
  }
  void merge() override {
    auto [w, b] = base_params();
    w.mul_(row_scale(w));
    b.mul_(scale).add_(shift);
  }
  void unmerge() override {
    auto [w, b] = base_params();
    b.sub_(shift).div_(scale);
    w.div_(row_scale(w));
  }
  std::string path_;
  std::shared_ptr<Op> base;
  torch::Tensor scale, shift;
};

struct Ssf : Method {
  bool mergeable() const override { return true; }
  ParamList inject(VisionTransformerImpl& model, const PeftConfig& cfg) const override {
    ParamList owned;
    for (const Slot& s : target_slots(model, cfg, "re:.*", {Slot::Kind::Linear, Slot::Kind::Norm})) {
      auto op = std::make_shared<SsfOp>(*s.member, s.path);
      owned.push_back(op->scale);
      owned.push_back(op->shift);
      s.replace(op);
    }
    return owned;
  }
};

}  // namespace

void register_ssf(MethodRegistry& r) { r.add("ssf", std::make_unique<Ssf>()); }

}  // namespace shardtune
