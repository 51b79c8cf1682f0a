// Hugging Face PEFT's LoRA adapter format, both ways (src/peft/utils/save_and_load.py,
// tuners/lora/config.py, tuners/lora/layer.py):
//   adapter_model.safetensors  base_model.model.<module>.lora_A.weight [r, in]
//                              base_model.model.<module>.lora_B.weight [out, r]
//                              base_model.model.head.weight / .bias (modules_to_save)
//   adapter_config.json        peft_type "LORA", r, lora_alpha, target_modules, rank_pattern,
//                              alpha_pattern, use_rslora, modules_to_save, ...
// with y = base(x) + lora_B(lora_A(dropout(x))) * scaling, scaling = lora_alpha / r
// (lora_alpha / sqrt(r) with use_rslora).
//
// ShardTune's LoRA on q and v of a fused attn.qkv (peft.qkv_parts=q,v: pairs (A_q, B_q),
// (A_v, B_v) of rank r) is the PEFT LoRA on qkv of rank 2r with
//   lora_A = [A_q; A_v]                                 [2r, in]
//   lora_B = B_q in q's rows, columns 0..r-1; B_v in v's rows, columns r..2r-1; 0 elsewhere
// and lora_alpha chosen so that the scaling is the same (2 alpha without rslora): then
// lora_B lora_A = [B_q A_q; 0; B_v A_v], exactly ShardTune's update. Every other LoRA maps
// one to one (the same names). Reading back splits the stacked pair again.
#pragma once

#include <torch/torch.h>

#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "models/vit_config.h"
#include "peft/peft_config.h"

namespace shardtune {

using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

// The LoRA run's trainable tensors (the model's names: "blocks.0.attn.qkv.lora_A_q.weight",
// "head.weight") as PEFT keys them (without the base_model.model. prefix), and PEFT's config
// fields into `config` (sorted keys, as PEFT writes them).
NamedTensors lora_to_peft(const NamedTensors& trainable, const PeftConfig& cfg, const ViTConfig& model,
                          nlohmann::json& config);

// The inverse for an adapter ShardTune wrote with `cfg`: PEFT-keyed tensors (no prefix) under
// the model's names. A stacked q/k/v pair whose lora_B holds a non-zero outside its parts'
// blocks (changed elsewhere: then it is a plain PEFT LoRA) is an error naming `source`.
NamedTensors lora_from_peft(const NamedTensors& file, const PeftConfig& cfg, const std::string& source);

// A PEFT adapter_config.json (written by PEFT, not ShardTune) as a PeftConfig for method lora
// (qkv_parts=all: PEFT's LoRA on qkv covers all its rows). What ShardTune cannot honour is a
// std::invalid_argument naming `source`, the key and its value: another peft_type, use_dora,
// bias other than "none", fan_in_fan_out, layers_to_transform, modules_to_save other than the
// head, and the like.
PeftConfig peft_lora_config(const json::Json& v, const std::string& source);

}  // namespace shardtune
