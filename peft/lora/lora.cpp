// LoRA (Hu et al.): y = base(x) + B A dropout(x) * alpha/r on chosen output rows.
// A [r, in] ~ U(+-1/sqrt(in)) as torch.nn.Linear, B [rows, r] = 0, so step 0 equals the
// base model. On a fused attn.qkv the update covers only the parts in peft.qkv_parts
// (q and v by default, as in the VTAB-1k LoRA results), one (A, B) pair per part, named
// lora_A_q / lora_B_q; elsewhere one pair over all rows, named lora_A / lora_B.
//
// Over a tensor-parallel base every rank keeps the full A and B and uses its part: over a
// column-parallel base A whole and B's rows of this rank's outputs; over a row-parallel
// base A's columns of this rank's inputs and B whole, the update added to the partial
// output before the all-reduce. Both enter the region through f, so their gradients are
// summed over the tp group.
#include <stdexcept>

#include "peft/method.h"

namespace shardtune {

namespace {

struct LoraPair {
  int64_t offset, rows;  // output rows [offset, offset + rows) of the base layer
  torch::Tensor A, B;    // A [r, in], B [rows, r]
};

struct LoraLinear : Op, Mergeable {
  LoraLinear(std::shared_ptr<Op> base_op, const PeftConfig& cfg, const std::vector<std::pair<std::string, int64_t>>& parts)
      : scaling(cfg.alpha / static_cast<double>(cfg.rank)), dropout_p(cfg.dropout) {
    base = register_module("base_layer", std::move(base_op));
    dense = dynamic_cast<DenseLinear*>(base.get());
    if (!dense) throw std::logic_error("LoRA wraps a plain Linear");
    const int64_t in = dense->in_features, out = dense->out_features;
    const int64_t rows = parts.empty() ? out : out / 3;
    auto add_pair = [&](const std::string& suffix, int64_t offset) {
      auto a = register_module("lora_A" + suffix, std::make_shared<torch::nn::Module>());
      auto b = register_module("lora_B" + suffix, std::make_shared<torch::nn::Module>());
      LoraPair p{offset, rows, a->register_parameter("weight", torch::empty({cfg.rank, in})),
                 b->register_parameter("weight", torch::zeros({rows, cfg.rank}))};
      kaiming_uniform_linear_(p.A);
      pairs.push_back(p);
    };
    if (parts.empty()) add_pair("", 0);
    for (const auto& [name, index] : parts) add_pair("_" + name, index * rows);
  }

  torch::Tensor forward(const torch::Tensor& x) override {
    if (merged) return base->forward(x);
    torch::Tensor xe = dense->enter(x);
    torch::Tensor y = dense->local(xe);
    torch::Tensor xin = dropout_p > 0 ? torch::dropout(xe, dropout_p, is_training()) : xe;
    auto delta = [&](const LoraPair& p) {
      torch::Tensor A = dense->in_cols(dense->region(p.A), 1), B = dense->out_rows(dense->region(p.B), p.offset);
      return torch::linear(torch::linear(xin, cast_like(A, xin)), cast_like(B, xin));
    };
    if (pairs.size() == 1 && pairs[0].rows == dense->out_features) return dense->leave(y + delta(pairs[0]) * scaling);
    for (const auto& p : pairs) {  // in place into the output slice: the base's backward does not need y
      auto [start, count] = dense->local_range(p.offset, p.rows);
      if (count > 0) y.narrow(-1, start, count).add_(delta(p), scaling);
    }
    return dense->leave(y);
  }

  void apply(double sign) {
    for (const auto& p : pairs) {
      auto [start, count] = dense->local_range(p.offset, p.rows);
      torch::Tensor d = dense->in_cols(dense->out_rows(torch::matmul(p.B, p.A), p.offset), 1);
      dense->weight.narrow(0, start, count).add_(d.to(dense->weight.scalar_type()), sign * scaling);
    }
  }
  void merge() override { apply(+1); }
  void unmerge() override { apply(-1); }

  std::shared_ptr<Op> base;
  DenseLinear* dense;  // base, as a linear layer
  std::vector<LoraPair> pairs;
  double scaling, dropout_p;
};

struct Lora : Method {
  bool mergeable() const override { return true; }

  ParamList inject(VisionTransformerImpl& model, const PeftConfig& cfg) const override {
    if (cfg.rank <= 0) throw std::invalid_argument("peft.rank=" + std::to_string(cfg.rank) + " must be positive");
    if (cfg.dropout < 0 || cfg.dropout >= 1)
      throw std::invalid_argument("peft.dropout=" + std::to_string(cfg.dropout) + " must be in [0, 1)");
    std::vector<std::pair<std::string, int64_t>> parts;
    for (const auto& p : split_list(cfg.qkv_parts)) {
      int64_t index = p == "q" ? 0 : p == "k" ? 1 : p == "v" ? 2 : -1;
      if (index < 0) throw std::invalid_argument("peft.qkv_parts=" + cfg.qkv_parts + ": '" + p + "' is not q, k or v");
      parts.emplace_back(p, index);
    }
    if (parts.empty()) throw std::invalid_argument("peft.qkv_parts is empty");
    ParamList owned;
    for (const Slot& s : target_slots(model, cfg, "attn.qkv", {Slot::Kind::Linear})) {
      seed_peft_init(s.path);
      bool fused_qkv = s.name == "qkv";
      auto layer = std::make_shared<LoraLinear>(*s.member, cfg,
                                                fused_qkv ? parts : std::vector<std::pair<std::string, int64_t>>{});
      for (const auto& p : layer->pairs) {
        owned.push_back(p.A);
        owned.push_back(p.B);
      }
      s.replace(layer);
    }
    return owned;
  }
};

}  // namespace

void register_lora(MethodRegistry& r) { r.add("lora", std::make_unique<Lora>()); }

}  // namespace shardtune
