// PEFT hyper-parameters ([peft] section) and their JSON form in adapter_config.json.
#pragma once

#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "io/strict_json.h"
#include "models/vit_config.h"

namespace shardtune {

struct PeftConfig {
  std::string method = "none";  // lora adapter adaptformer vpt_shallow vpt_deep prefix bitfit ln_tune ssf fact_tt lst linear full none
  std::string targets;          // "a,b" (exact or .suffix matches) or "re:<regex>"; empty: the method's default
  std::string exclude;          // same syntax; removes matches
  std::string qkv_parts = "q,v";  // LoRA on a fused attn.qkv: which of q, k, v, or "all" (one pair over the whole qkv)
  int64_t rank = 8;             // LoRA / FacT rank
  double alpha = 8;             // LoRA scaling = alpha / rank (alpha / sqrt(rank) with rslora)
  // LoRA per module, as PEFT's rank_pattern / alpha_pattern: the first key (a regex) that
  // matches the end of a module's path after a '.' gives its rank / alpha.
  std::vector<std::pair<std::string, int64_t>> rank_pattern;
  std::vector<std::pair<std::string, double>> alpha_pattern;
  bool rslora = false;          // rank-stabilised LoRA (Kalajdzievski 2023): scaling = alpha / sqrt(rank)
  double dropout = 0;           // LoRA input dropout
  int64_t bottleneck = 8;       // adapter / adaptformer width
  int64_t prompt_len = 10;      // vpt / prefix tokens
  std::optional<double> scale;  // adaptformer (default 0.1), fact_tt (default 1)
  bool train_head = true;       // the classifier head trains for every method but none
  std::string side_blocks;      // lst: blocks with a ladder, "0,2,4" or "6-11"; empty: every block
  int64_t side_reduction = 8;   // lst: the side stream is model.dim / side_reduction wide
  std::string init_adapter;     // train: an adapter directory (ShardTune's or Hugging Face PEFT's LoRA) to start from

  double scale_or(double fallback) const { return scale.value_or(fallback); }
  json::Json to_json() const;  // init_adapter is a run's input, not part of the adapter: left out
  // Throws std::invalid_argument naming the key when a field is missing or malformed.
  static PeftConfig from_json(const json::Json& v, const std::string& source);
};

// lst: the side blocks' shape (width model.dim / peft.side_reduction, max(1, width / 64) heads,
// a divisor of the width; the backbone's MLP ratio; qkv bias, no layer scale or qk norm), and
// the blocks whose output feeds the side stream (peft.side_blocks: "0,2,4", "6-11"; empty:
// all). Throw std::invalid_argument naming the key.
ViTConfig side_config(const ViTConfig& model, const PeftConfig& cfg);
std::set<int64_t> side_block_set(const PeftConfig& cfg, int64_t depth);

// "a, b,c" -> {"a", "b", "c"} (trimmed, empties dropped).
std::vector<std::string> split_list(const std::string& s);

// "attn.qkv:16, mlp.fc1:4" -> {{"attn.qkv", "16"}, {"mlp.fc1", "4"}}: the last ':' of an item
// splits it. Throws std::invalid_argument naming `key` for an item without one.
std::vector<std::pair<std::string, std::string>> split_pairs(const std::string& s, const std::string& key);

}  // namespace shardtune
