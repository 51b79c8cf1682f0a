// LoRA's per-module hyper-parameters, shared by the layer (lora.cpp) and the Hugging Face
// PEFT file format (peft_format.cpp).
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "peft/peft_config.h"

namespace shardtune {

struct LoraShape {
  int64_t rank;
  double alpha;
  double scaling;  // alpha / rank, or alpha / sqrt(rank) with rslora
};

// Whether a rank_pattern / alpha_pattern key matches the module at `path`: as PEFT, the key
// is a regex that must match the whole path or its end after a '.' ("attn.qkv" matches
// "blocks.3.attn.qkv"; "3.attn.qkv" matches it and not "blocks.13.attn.qkv").
bool pattern_matches(const std::string& key, const std::string& path);

// The rank, alpha and scaling of the module at `path`: the first matching rank_pattern /
// alpha_pattern key, else peft.rank / peft.alpha. Throws std::invalid_argument naming the key
// for a rank that is not positive or a key that is not a valid regex.
LoraShape lora_shape(const PeftConfig& cfg, const std::string& path);

// peft.qkv_parts as (name, index among q, k, v) in q, k, v order; empty for "all" (one pair
// over the whole fused qkv). Throws std::invalid_argument naming the key for anything else.
std::vector<std::pair<std::string, int64_t>> qkv_parts(const std::string& spec);

}  // namespace shardtune
