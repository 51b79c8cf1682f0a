// A PEFT method: how it changes a backbone, and which parameters it then owns.
//
// Order (STYLE.md): load -> parallelize -> inject -> freeze -> optimizer over trainables.
// `inject` adds the method's modules through the model's slots and extension points and
// returns the parameters the method owns; `apply_peft` then freezes every other backbone
// parameter, so trainability follows from what was injected, never from names.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "models/vit.h"
#include "peft/peft_config.h"

namespace shardtune {

// The parameters a method owns (trainable), in a stable order.
using ParamList = std::vector<torch::Tensor>;

struct Method {
  virtual ~Method() = default;
  // Modifies `model` and returns the parameters it owns. Random initialisation draws from
  // torch's global generator, full tensors only, so every rank draws the same values.
  virtual ParamList inject(VisionTransformerImpl& model, const PeftConfig& cfg) const = 0;
  // Whether merge_peft can fold this method into plain backbone weights.
  virtual bool mergeable() const { return false; }
};

// A layer wrapper whose update can be folded into its base weights and taken out again.
struct Mergeable {
  virtual ~Mergeable() = default;
  virtual void merge() = 0;    // base += delta; forward then skips the delta
  virtual void unmerge() = 0;  // base -= delta
  bool merged = false;
};

// Registry by name; registering a name twice is an error.
class MethodRegistry {
 public:
  static MethodRegistry& instance();  // holds every built-in method
  void add(const std::string& name, std::unique_ptr<Method> m);
  // Throws std::invalid_argument "peft.method=X is not a known method (known: ...)".
  const Method& get(const std::string& name) const;
  std::vector<std::string> names() const;

 private:
  std::map<std::string, std::unique_ptr<Method>> methods_;
};

// What injection left: the trainable parameters by full path (head included when trained).
struct PeftState {
  std::string method;
  std::vector<std::pair<std::string, torch::Tensor>> trainable;
  ParamList base_params;  // the backbone's own parameters, recorded before injection
  int64_t trainable_count() const;
};

// Injects cfg.method into `model`, freezes everything it does not own (the head stays
// trainable with cfg.train_head, except for "none"), and returns the trainable parameters.
PeftState apply_peft(VisionTransformerImpl& model, const PeftConfig& cfg);

// Folds every Mergeable wrapper into its base layer (or takes it out again). Throws
// std::invalid_argument when the model's method cannot merge.
void merge_peft(torch::nn::Module& model, const std::string& method);
void unmerge_peft(torch::nn::Module& model);

// The plain backbone's state after merging: PEFT parameters dropped, wrapper paths
// ("blocks.0.attn.qkv.base_layer.weight") back to timm's ("blocks.0.attn.qkv.weight").
std::vector<std::pair<std::string, torch::Tensor>> backbone_state(torch::nn::Module& model, const PeftState& peft);

// Stores every frozen parameter in `dtype` (bf16 compute: half the memory of the backbone).
// Trainable parameters, their gradients and optimizer state stay fp32; layers cast
// parameters to the activations' dtype on use (cast_like).
void cast_frozen(torch::nn::Module& model, torch::ScalarType dtype);

// --- helpers shared by the methods ----------------------------------------------------

// The slots of `kind` inside blocks (head excluded), matched against cfg.targets (or
// `default_targets` when cfg.targets is empty) and cfg.exclude.
std::vector<Slot> target_slots(VisionTransformerImpl& model, const PeftConfig& cfg, const std::string& default_targets,
                               const std::vector<Slot::Kind>& kinds);

// Output width of a slot's layer (DenseLinear rows or LayerNorm width).
int64_t out_features(Op& op);

// Seeds torch's global generator for the parameters a method creates at `path`, from the
// seed apply_peft was called with and the path, so a pipeline stage that builds only some
// blocks draws the same initial values as one process building them all.
void seed_peft_init(const std::string& path);

// torch.nn.Linear's default init: U(-1/sqrt(in), 1/sqrt(in)).
void kaiming_uniform_linear_(torch::Tensor w);

// A bottleneck pair registered on `owner`: down [width, dim] (torch.nn.Linear init, zero
// bias) and up [dim, width] = 0 with zero bias, so the branch starts as exact zero.
struct Bottleneck {
  std::shared_ptr<DenseLinear> down, up;
  ParamList params() const { return {down->weight, down->bias, up->weight, up->bias}; }
};
Bottleneck make_bottleneck(torch::nn::Module& owner, const std::string& down_name, const std::string& up_name,
                           int64_t dim, int64_t width);

// Registrations, one per method folder (called once by MethodRegistry::instance()).
void register_lora(MethodRegistry& r);
void register_adapter(MethodRegistry& r);
void register_adaptformer(MethodRegistry& r);
void register_vpt(MethodRegistry& r);
void register_prefix(MethodRegistry& r);
void register_selective(MethodRegistry& r);
void register_ssf(MethodRegistry& r);
void register_fact_tt(MethodRegistry& r);
void register_lst(MethodRegistry& r);

}  // namespace shardtune
