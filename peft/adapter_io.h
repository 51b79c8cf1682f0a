// Adapter files, Hugging Face PEFT style:
//   DIR/adapter_model.safetensors  every trainable tensor, full (unsharded), keys
//                                  "base_model.model.<path>", e.g.
//                                  base_model.model.blocks.0.attn.qkv.lora_A_q.weight
//   DIR/adapter_config.json        {"method", hyper-parameters, "target_modules",
//                                   "base_model": {arch and shape}}
#pragma once

#include <string>

#include "models/checkpoint.h"
#include "models/vit_config.h"
#include "peft/method.h"
#include "peft/peft_config.h"

namespace shardtune {

inline constexpr const char* kAdapterKeyPrefix = "base_model.model.";

struct AdapterConfig {
  PeftConfig peft;
  ViTConfig model;
};

// Writes both files atomically into `dir` (created if missing).
void save_adapter(const std::string& dir, const PeftState& state, const PeftConfig& peft, const ViTConfig& model);

// Reads DIR/adapter_config.json. Throws std::runtime_error naming the file and the problem.
AdapterConfig read_adapter_config(const std::string& dir);

// Throws std::runtime_error listing every field of the adapter's base model that differs
// from `model` ("model.dim: adapter 64, model 32").
void check_adapter_fits(const AdapterConfig& adapter, const ViTConfig& model, const std::string& dir);

// Copies DIR/adapter_model.safetensors into the trainable parameters of an injected
// model. Missing keys, unexpected keys and shape mismatches are listed in one error.
// Keys `elsewhere` accepts (full keys, other pipeline stages' tensors) are not unexpected.
void load_adapter_weights(const std::string& dir, const PeftState& state, const KeyFilter& elsewhere = nullptr);

json::Value vit_config_to_json(const ViTConfig& c);
ViTConfig vit_config_from_json(const json::Value& v, const std::string& source);

}  // namespace shardtune
