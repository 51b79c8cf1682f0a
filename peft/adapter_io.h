// Adapter directories:
//   DIR/adapter_model.safetensors  every trainable tensor, full (unsharded), keys
//                                  "base_model.model.<path>"
//   DIR/adapter_config.json
//
// Format 2 (written now). LoRA is a Hugging Face PEFT LoRA adapter (peft/lora/peft_format.h):
// PEFT's config fields and keys ("...attn.qkv.lora_A.weight"), q/v pairs stacked into one
// qkv pair, the head in modules_to_save. Every method's config also holds a "shardtune"
// section (PEFT ignores unknown keys): format_version, method, the [peft] keys, the
// backbone's shape and the tensor list. Other methods keep the model's own names
// (docs/ADAPTER_FORMAT.md); BitFit and LN-tuning files are full-tensor replacements of the
// backbone's parameters at their timm paths.
// Read too: format 1 (ShardTune's earlier layout: the [peft] keys at the top, "lora_A_q"
// keys) and a LoRA adapter PEFT wrote for a timm ViT (no "shardtune" section).
#pragma once

#include <optional>
#include <string>

#include "models/checkpoint.h"
#include "models/vit_config.h"
#include "peft/method.h"
#include "peft/peft_config.h"

namespace shardtune {

inline constexpr const char* kAdapterKeyPrefix = "base_model.model.";
inline constexpr int kAdapterFormatVersion = 2;

struct AdapterConfig {
  PeftConfig peft;
  std::optional<ViTConfig> model;  // the backbone it was made for (none in a PEFT-made adapter)
  int format = kAdapterFormatVersion;  // 1, 2, or 0: made by Hugging Face PEFT
};

// Writes both files atomically into `dir` (created if missing).
void save_adapter(const std::string& dir, const PeftState& state, const PeftConfig& peft, const ViTConfig& model);

// Reads DIR/adapter_config.json in any of the formats above. Throws std::runtime_error
// naming the file and the problem (malformed JSON, a key ShardTune cannot honour).
AdapterConfig read_adapter_config(const std::string& dir);

// Throws std::runtime_error listing every field of the adapter's base model that differs
// from `model` ("model.dim: adapter 64, model 32"). A PEFT-made adapter names no backbone:
// its tensors' shapes are checked when they load.
void check_adapter_fits(const AdapterConfig& adapter, const ViTConfig& model, const std::string& dir);

// The [peft] keys a run trains with when it starts from `adapter` (peft.init_adapter): the
// adapter's method and shape (targets, ranks, alphas, parts), the run's own dropout; the head
// trains when the adapter holds one or peft.train_head says so (from its initialisation then).
// A peft.method other than the adapter's (or none) is an error naming both.
PeftConfig peft_for_init(const PeftConfig& run, const AdapterConfig& adapter);

// Copies DIR/adapter_model.safetensors into the trainable parameters of an injected
// model (a head the adapter's config says it does not hold is left as it is). Missing keys, unexpected keys and shape mismatches are listed in one error.
// Keys `elsewhere` accepts (full keys, other pipeline stages' tensors) are not unexpected.
void load_adapter_weights(const std::string& dir, const PeftState& state, const KeyFilter& elsewhere = nullptr);

json::Json vit_config_to_json(const ViTConfig& c);
ViTConfig vit_config_from_json(const json::Json& v, const std::string& source);

}  // namespace shardtune
