// PEFT hyper-parameters ([peft] section) and their JSON form in adapter_config.json.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "io/json.h"

namespace shardtune {

struct PeftConfig {
  std::string method = "none";  // lora adapter adaptformer vpt_shallow vpt_deep prefix bitfit ln_tune ssf fact_tt linear full none
  std::string targets;          // "a,b" (exact or .suffix matches) or "re:<regex>"; empty: the method's default
  std::string exclude;          // same syntax; removes matches
  std::string qkv_parts = "q,v";  // LoRA on a fused attn.qkv: which of q, k, v
  int64_t rank = 8;             // LoRA / FacT rank
  double alpha = 8;             // LoRA scaling = alpha / rank
  double dropout = 0;           // LoRA input dropout
  int64_t bottleneck = 8;       // adapter / adaptformer width
  int64_t prompt_len = 10;      // vpt / prefix tokens
  std::optional<double> scale;  // adaptformer (default 0.1), fact_tt (default 1)
  bool train_head = true;       // the classifier head trains for every method but none

  double scale_or(double fallback) const { return scale.value_or(fallback); }
  json::Value to_json() const;
  // Throws std::invalid_argument naming the key when a field is missing or malformed.
  static PeftConfig from_json(const json::Value& v, const std::string& source);
};

// "a, b,c" -> {"a", "b", "c"} (trimmed, empties dropped).
std::vector<std::string> split_list(const std::string& s);

}  // namespace shardtune
