#include <cmath>
#include <set>
#include <stdexcept>

#include "peft/method.h"
#include "peft/targets.h"

namespace shardtune {

// --- registry --------------------------------------------------------------------------

MethodRegistry& MethodRegistry::instance() {
  static MethodRegistry* r = [] {
    auto* reg = new MethodRegistry;
    register_lora(*reg);
    register_adapter(*reg);
    register_adaptformer(*reg);
    register_vpt(*reg);
    register_prefix(*reg);
    register_selective(*reg);
    register_ssf(*reg);
    register_fact_tt(*reg);
    register_lst(*reg);
    return reg;
  }();
  return *r;
}

void MethodRegistry::add(const std::string& name, std::unique_ptr<Method> m) {
  if (!methods_.emplace(name, std::move(m)).second)
    throw std::logic_error("PEFT method '" + name + "' is registered twice");
}

const Method& MethodRegistry::get(const std::string& name) const {
  auto it = methods_.find(name);
  if (it == methods_.end()) {
    std::string known;
    for (const auto& n : names()) known += (known.empty() ? "" : ", ") + n;
    throw std::invalid_argument("peft.method=" + name + " is not a known method (known: " + known + ")");
  }
  return *it->second;
}

std::vector<std::string> MethodRegistry::names() const {
  std::vector<std::string> n;
  for (const auto& [k, _] : methods_) n.push_back(k);
  return n;
}

// --- injection and freezing -----------------------------------------------------------------

int64_t PeftState::trainable_count() const {
  int64_t n = 0;
  for (const auto& [_, t] : trainable) n += t.numel();
  return n;
}

namespace {
uint64_t g_peft_seed = 0;
}

void seed_peft_init(const std::string& path) { seed_for_path(g_peft_seed, path); }

PeftState apply_peft(VisionTransformerImpl& model, const PeftConfig& cfg) {
  const Method& method = MethodRegistry::instance().get(cfg.method);
  at::Generator gen = at::detail::getDefaultCPUGenerator();
  g_peft_seed = gen.current_seed();
  const torch::Tensor before = gen.get_state();
  PeftState state;
  state.method = cfg.method;
  for (const auto& p : model.parameters()) state.base_params.push_back(p);

  ParamList owned = method.inject(model, cfg);
  gen.set_state(before);  // what follows (e.g. dropout) does not depend on the method's draws

  for (auto& p : model.parameters()) p.requires_grad_(false);
  for (auto& p : owned) p.requires_grad_(true);
  if (cfg.method != "none" && cfg.train_head && model.head)
    for (auto& p : model.head->parameters()) p.requires_grad_(true);
  for (const auto& p : model.named_parameters())
    if (p.value().requires_grad()) state.trainable.emplace_back(p.key(), p.value());
  return state;
}

void cast_frozen(torch::nn::Module& model, torch::ScalarType dtype) {
  torch::NoGradGuard no_grad;
  for (auto& p : model.parameters())
    if (!p.requires_grad()) p.set_data(p.data().to(dtype));
}

// --- merging -----------------------------------------------------------------------------

void merge_peft(torch::nn::Module& model, const std::string& method) {
  if (!MethodRegistry::instance().get(method).mergeable())
    throw std::invalid_argument("peft.method=" + method + " cannot be merged into the backbone (mergeable: lora, ssf, fact_tt)");
  torch::NoGradGuard no_grad;
  for (auto& m : model.modules())
    if (auto* mg = dynamic_cast<Mergeable*>(m.get()); mg && !mg->merged) {
      mg->merge();
      mg->merged = true;
    }
}

void unmerge_peft(torch::nn::Module& model) {
  torch::NoGradGuard no_grad;
  for (auto& m : model.modules())
    if (auto* mg = dynamic_cast<Mergeable*>(m.get()); mg && mg->merged) {
      mg->unmerge();
      mg->merged = false;
    }
}

std::vector<std::pair<std::string, torch::Tensor>> backbone_state(torch::nn::Module& model, const PeftState& peft) {
  std::set<const void*> base;
  for (const auto& p : peft.base_params) base.insert(p.unsafeGetTensorImpl());
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& p : model.named_parameters()) {
    if (!base.count(p.value().unsafeGetTensorImpl())) continue;  // injected by the method
    std::string name = p.key();
    for (size_t at; (at = name.find(".base_layer.")) != std::string::npos;) name.erase(at, 11);
    out.emplace_back(name, p.value());
  }
  return out;
}

// --- helpers -------------------------------------------------------------------------------

std::vector<Slot> target_slots(VisionTransformerImpl& model, const PeftConfig& cfg, const std::string& default_targets,
                               const std::vector<Slot::Kind>& kinds) {
  std::vector<Slot> candidates;
  std::vector<std::string> names;
  for (const Slot& s : slots(model)) {
    bool kind_ok = false;
    for (auto k : kinds) kind_ok |= s.kind == k;
    if (!kind_ok || s.path == "head") continue;
    candidates.push_back(s);
    names.push_back(s.path);
  }
  std::vector<std::string> chosen =
      match_targets(names, cfg.targets.empty() ? default_targets : cfg.targets, cfg.exclude,
                    /*require_match=*/model.part.first_block == 0 && model.part.end_block == model.config.depth);
  std::vector<Slot> out;
  for (const Slot& s : candidates)
    for (const auto& c : chosen)
      if (s.path == c) out.push_back(s);
  return out;
}

int64_t out_features(Op& op) {
  if (auto* d = dynamic_cast<DenseLinear*>(&op)) return d->out_features;
  if (auto* n = dynamic_cast<LayerNormOp*>(&op)) return n->width;
  throw std::logic_error("PEFT can only wrap a plain Linear or LayerNorm");
}

Bottleneck make_bottleneck(torch::nn::Module& owner, const std::string& down_name, const std::string& up_name,
                           int64_t dim, int64_t width) {
  if (width <= 0) throw std::invalid_argument("peft.bottleneck=" + std::to_string(width) + " must be positive");
  Bottleneck b{owner.register_module(down_name, std::make_shared<DenseLinear>(dim, width, true)),
               owner.register_module(up_name, std::make_shared<DenseLinear>(width, dim, true))};
  kaiming_uniform_linear_(b.down->weight);
  torch::NoGradGuard g;
  b.down->bias.zero_();
  b.up->weight.zero_();
  b.up->bias.zero_();
  return b;
}

void kaiming_uniform_linear_(torch::Tensor w) {
  torch::NoGradGuard no_grad;
  double bound = 1.0 / std::sqrt(static_cast<double>(w.size(1)));
  w.uniform_(-bound, bound);
}

}  // namespace shardtune
