#include "peft/peft_config.h"

#include <algorithm>
#include <stdexcept>

namespace shardtune {

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= s.size()) {
    size_t comma = s.find(',', start);
    if (comma == std::string::npos) comma = s.size();
    std::string item = s.substr(start, comma - start);
    size_t a = item.find_first_not_of(" \t"), b = item.find_last_not_of(" \t");
    if (a != std::string::npos) out.push_back(item.substr(a, b - a + 1));
    start = comma + 1;
  }
  return out;
}

std::vector<std::pair<std::string, std::string>> split_pairs(const std::string& s, const std::string& key) {
  std::vector<std::pair<std::string, std::string>> out;
  for (const std::string& item : split_list(s)) {
    const size_t colon = item.rfind(':');
    if (colon == std::string::npos || colon == 0 || colon + 1 == item.size())
      throw std::invalid_argument(key + "=" + s + ": '" + item + "' is not PATTERN:VALUE");
    out.emplace_back(item.substr(0, colon), item.substr(colon + 1));
  }
  return out;
}

namespace {

int64_t side_heads(int64_t width) {
  int64_t h = std::max<int64_t>(1, width / 64);
  while (width % h != 0) --h;
  return h;
}

}  // namespace

ViTConfig side_config(const ViTConfig& model, const PeftConfig& cfg) {
  if (cfg.side_reduction < 1 || cfg.side_reduction > model.dim)
    throw std::invalid_argument("peft.side_reduction=" + std::to_string(cfg.side_reduction) + " must be in [1, model.dim=" +
                                std::to_string(model.dim) + "]");
  ViTConfig s = model;
  s.dim = model.dim / cfg.side_reduction;
  s.heads = side_heads(s.dim);
  s.mlp_dim = std::max<int64_t>(1, model.mlp_dim * s.dim / model.dim);
  s.qkv_bias = true;
  s.qk_norm = false;
  s.layer_scale = 0;
  return s;
}

std::set<int64_t> side_block_set(const PeftConfig& cfg, int64_t depth) {
  std::set<int64_t> out;
  if (cfg.side_blocks.empty()) {
    for (int64_t i = 0; i < depth; ++i) out.insert(i);
    return out;
  }
  auto bad = [&](const std::string& why) {
    return std::invalid_argument("peft.side_blocks=" + cfg.side_blocks + ": " + why);
  };
  auto number = [&](const std::string& t) {
    size_t used = 0;
    int64_t v = -1;
    try {
      v = std::stoll(t, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != t.size() || t.empty()) throw bad("'" + t + "' is not a block index");
    if (v < 0 || v >= depth) throw bad("block " + t + " is not in [0, model.depth=" + std::to_string(depth) + ")");
    return v;
  };
  for (const std::string& item : split_list(cfg.side_blocks)) {
    const size_t dash = item.find('-', 1);
    if (dash == std::string::npos) {
      out.insert(number(item));
      continue;
    }
    const int64_t a = number(item.substr(0, dash)), b = number(item.substr(dash + 1));
    if (a > b) throw bad("'" + item + "' is an empty range");
    for (int64_t i = a; i <= b; ++i) out.insert(i);
  }
  if (out.empty()) throw bad("no block");
  return out;
}

json::Json PeftConfig::to_json() const {
  // [[key, value], ...]: the first matching key wins, so the order must survive a writer that
  // sorts object keys (adapter_config.json is written sorted, as PEFT writes it).
  json::Json ranks = json::Json::array(), alphas = json::Json::array();
  for (const auto& [k, v] : rank_pattern) ranks.push_back({k, v});
  for (const auto& [k, v] : alpha_pattern) alphas.push_back({k, v});
  return {{"method", method},
          {"targets", targets},
          {"exclude", exclude},
          {"qkv_parts", qkv_parts},
          {"rank", rank},
          {"alpha", alpha},
          {"rank_pattern", ranks},
          {"alpha_pattern", alphas},
          {"rslora", rslora},
          {"dropout", dropout},
          {"bottleneck", bottleneck},
          {"prompt_len", prompt_len},
          {"scale", scale ? json::Json(*scale) : json::Json(nullptr)},
          {"train_head", train_head},
          {"side_blocks", side_blocks},
          {"side_reduction", side_reduction}};
}

PeftConfig PeftConfig::from_json(const json::Json& v, const std::string& source) {
  PeftConfig c;
  auto field = [&](const char* key) -> const json::Json& {
    if (!v.is_object() || !v.contains(key)) throw std::invalid_argument(source + ": missing \"" + key + "\"");
    return v[key];
  };
  const char* reading = "";
  try {
    c.method = json::to_string(field(reading = "method"));
    c.targets = json::to_string(field(reading = "targets"));
    c.exclude = json::to_string(field(reading = "exclude"));
    c.qkv_parts = json::to_string(field(reading = "qkv_parts"));
    c.rank = json::to_int64(field(reading = "rank"));
    c.alpha = json::to_double(field(reading = "alpha"));
    c.dropout = json::to_double(field(reading = "dropout"));
    c.bottleneck = json::to_int64(field(reading = "bottleneck"));
    c.prompt_len = json::to_int64(field(reading = "prompt_len"));
    if (!field(reading = "scale").is_null()) c.scale = json::to_double(field("scale"));
    c.train_head = json::to_bool(field(reading = "train_head"));
    // Since format 2 (older adapters have none of these: plain LoRA).
    if (v.contains(reading = "rslora")) c.rslora = json::to_bool(v[reading]);
    if (v.contains(reading = "side_blocks")) c.side_blocks = json::to_string(v[reading]);
    if (v.contains(reading = "side_reduction")) c.side_reduction = json::to_int64(v[reading]);
    auto pairs = [&](const char* key, auto& out, auto read) {
      if (!v.contains(reading = key)) return;
      for (const auto& kv : v[key]) {
        if (!kv.is_array() || kv.size() != 2) throw std::runtime_error(json::dump(kv) + " is not a [key, value] pair");
        out.emplace_back(json::to_string(kv[0]), read(kv[1]));
      }
    };
    pairs("rank_pattern", c.rank_pattern, json::to_int64);
    pairs("alpha_pattern", c.alpha_pattern, json::to_double);
  } catch (const std::invalid_argument&) {
    throw;
  } catch (const std::exception& e) {
    throw std::invalid_argument(source + ": malformed PEFT config: \"" + reading + "\": " + e.what());
  }
  return c;
}

}  // namespace shardtune
