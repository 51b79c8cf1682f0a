#include "peft/peft_config.h"

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

json::Value PeftConfig::to_json() const {
  json::Value v;
  v.set("method", method);
  v.set("targets", targets);
  v.set("exclude", exclude);
  v.set("qkv_parts", qkv_parts);
  v.set("rank", rank);
  v.set("alpha", alpha);
  v.set("dropout", dropout);
  v.set("bottleneck", bottleneck);
  v.set("prompt_len", prompt_len);
  v.set("scale", scale ? json::Value(*scale) : json::Value(nullptr));
  v.set("train_head", train_head);
  return v;
}

PeftConfig PeftConfig::from_json(const json::Value& v, const std::string& source) {
  PeftConfig c;
  auto field = [&](const char* key) -> const json::Value& {
    const json::Value* f = v.is_object() ? v.find(key) : nullptr;
    if (!f) throw std::invalid_argument(source + ": missing \"" + key + "\"");
    return *f;
  };
  try {
    c.method = field("method").as_string();
    c.targets = field("targets").as_string();
    c.exclude = field("exclude").as_string();
    c.qkv_parts = field("qkv_parts").as_string();
    c.rank = field("rank").as_int64();
    c.alpha = field("alpha").as_double();
    c.dropout = field("dropout").as_double();
    c.bottleneck = field("bottleneck").as_int64();
    c.prompt_len = field("prompt_len").as_int64();
    if (!field("scale").is_null()) c.scale = field("scale").as_double();
    c.train_head = field("train_head").as_bool();
  } catch (const std::invalid_argument&) {
    throw;
  } catch (const std::exception& e) {
    throw std::invalid_argument(source + ": malformed PEFT config: " + e.what());
  }
  return c;
}

}  // namespace shardtune
