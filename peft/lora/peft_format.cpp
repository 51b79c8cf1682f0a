#include "peft/lora/peft_format.h"

#include <cmath>
#include <map>
#include <set>
#include <stdexcept>

#include "peft/lora/lora.h"

namespace shardtune {

namespace {

constexpr const char* kLoraA = ".lora_A";
constexpr const char* kLoraB = ".lora_B";

// "blocks.3.attn.qkv" -> {3, "attn.qkv"}; a path outside the blocks -> {-1, path}.
std::pair<int64_t, std::string> block_and_suffix(const std::string& path) {
  if (path.rfind("blocks.", 0) != 0) return {-1, path};
  const size_t dot = path.find('.', 7);
  if (dot == std::string::npos) return {-1, path};
  try {
    return {std::stoll(path.substr(7, dot - 7)), path.substr(dot + 1)};
  } catch (const std::exception&) {
    return {-1, path};
  }
}

// One LoRA module of the run: its pairs, by part index (-1: one pair over every row).
struct ModuleLora {
  std::string path;
  std::map<int64_t, std::pair<torch::Tensor, torch::Tensor>> pairs;  // part -> (A, B)
};

int64_t part_index(const std::string& suffix) {  // "" / "_q" / "_k" / "_v"
  if (suffix.empty()) return -1;
  if (suffix == "_q") return 0;
  if (suffix == "_k") return 1;
  if (suffix == "_v") return 2;
  throw std::logic_error("LoRA tensor suffix '" + suffix + "' is not _q, _k or _v");
}

// A value per module, written as PEFT's config does: the most common one as the default, the
// others as pattern keys. A key is the module's name inside its block ("attn.qkv") when every
// module of that name shares the value, else "3.attn.qkv" for block 3 alone: both match as
// PEFT matches pattern keys (a '.'-separated suffix), and neither matches another block.
template <typename T>
std::pair<T, nlohmann::json> default_and_pattern(const std::vector<std::pair<std::string, T>>& per_module) {
  std::map<T, int> count;
  for (const auto& [_, v] : per_module) ++count[v];
  T best = per_module.front().second;
  for (const auto& [_, v] : per_module)
    if (count[v] > count[best]) best = v;
  std::map<std::string, std::set<T>> by_suffix;
  for (const auto& [path, v] : per_module) by_suffix[block_and_suffix(path).second].insert(v);
  nlohmann::json pattern = nlohmann::json::object();
  for (const auto& [path, v] : per_module) {
    if (v == best) continue;
    const auto [block, suffix] = block_and_suffix(path);
    if (by_suffix[suffix].size() == 1 || block < 0)
      pattern[suffix] = v;
    else
      pattern[std::to_string(block) + "." + suffix] = v;
  }
  return {best, pattern};
}

}  // namespace

NamedTensors lora_to_peft(const NamedTensors& trainable, const PeftConfig& cfg, const ViTConfig& model,
                          nlohmann::json& config) {
  std::vector<ModuleLora> modules;
  std::map<std::string, size_t> where;
  NamedTensors out;
  std::vector<std::string> to_save;
  for (const auto& [name, t] : trainable) {
    const size_t a = name.find(kLoraA), b = name.find(kLoraB);
    const size_t at = a != std::string::npos ? a : b;
    if (at == std::string::npos) {  // the head (modules_to_save), full tensors under their own names
      const std::string module = name.substr(0, name.rfind('.'));
      if (std::find(to_save.begin(), to_save.end(), module) == to_save.end()) to_save.push_back(module);
      out.emplace_back(name, t);
      continue;
    }
    const std::string path = name.substr(0, at);
    const size_t end = name.rfind(".weight");
    const int64_t part = part_index(name.substr(at + 7, end - at - 7));
    if (!where.count(path)) {
      where[path] = modules.size();
      modules.push_back({path, {}});
    }
    auto& pair = modules[where[path]].pairs[part];
    (a != std::string::npos ? pair.first : pair.second) = t.detach().to(torch::kCPU);
  }

  std::vector<std::pair<std::string, int64_t>> ranks;
  std::vector<std::pair<std::string, double>> alphas;
  std::map<std::string, std::set<int64_t>> blocks_of;  // target_modules: name inside a block -> blocks
  for (const ModuleLora& m : modules) {
    const int64_t parts = static_cast<int64_t>(m.pairs.size());
    torch::Tensor A, B;
    if (m.pairs.count(-1)) {
      A = m.pairs.at(-1).first;
      B = m.pairs.at(-1).second;
    } else {  // stack the q/k/v pairs into one pair over the whole qkv
      const int64_t r = m.pairs.begin()->second.first.size(0);
      const int64_t rows = m.pairs.begin()->second.second.size(0);
      std::vector<torch::Tensor> as;
      B = torch::zeros({3 * rows, parts * r}, m.pairs.begin()->second.second.options());
      int64_t j = 0;
      for (const auto& [index, ab] : m.pairs) {
        as.push_back(ab.first);
        B.narrow(0, index * rows, rows).narrow(1, j * r, r).copy_(ab.second);
        ++j;
      }
      A = torch::cat(as, 0);
    }
    out.emplace_back(m.path + ".lora_A.weight", A);
    out.emplace_back(m.path + ".lora_B.weight", B);
    // The same scaling at the exported rank R = parts x r: alpha' / R = alpha / r (or with
    // rslora alpha' / sqrt(R) = alpha / sqrt(r)).
    const LoraShape s = lora_shape(cfg, m.path);
    const double p = static_cast<double>(parts);
    ranks.emplace_back(m.path, A.size(0));
    alphas.emplace_back(m.path, s.alpha * (cfg.rslora ? std::sqrt(p) : p));
    const auto [block, suffix] = block_and_suffix(m.path);
    blocks_of[block < 0 ? m.path : suffix].insert(block);
  }

  nlohmann::json targets = nlohmann::json::array();
  for (const auto& [suffix, blocks] : blocks_of) {
    if (static_cast<int64_t>(blocks.size()) == model.depth || *blocks.begin() < 0) {
      targets.push_back(suffix);  // every block's: the name matches them all
    } else {
      for (int64_t b : blocks) targets.push_back("blocks." + std::to_string(b) + "." + suffix);
    }
  }
  config = nlohmann::json::object();
  if (!ranks.empty()) {
    auto [r, rank_pattern] = default_and_pattern(ranks);
    auto [alpha, alpha_pattern] = default_and_pattern(alphas);
    config["r"] = r;
    config["lora_alpha"] = alpha;
    config["rank_pattern"] = rank_pattern;
    config["alpha_pattern"] = alpha_pattern;
  } else {
    config["r"] = cfg.rank;
    config["lora_alpha"] = cfg.alpha;
    config["rank_pattern"] = nlohmann::json::object();
    config["alpha_pattern"] = nlohmann::json::object();
  }
  config["peft_type"] = "LORA";
  config["target_modules"] = targets;
  config["modules_to_save"] = to_save.empty() ? nlohmann::json(nullptr) : nlohmann::json(to_save);
  config["lora_dropout"] = cfg.dropout;
  config["use_rslora"] = cfg.rslora;
  config["bias"] = "none";
  config["fan_in_fan_out"] = false;
  config["init_lora_weights"] = true;
  config["use_dora"] = false;
  config["layers_to_transform"] = nullptr;
  config["layers_pattern"] = nullptr;
  config["task_type"] = nullptr;
  config["base_model_name_or_path"] = nullptr;
  config["revision"] = nullptr;
  config["inference_mode"] = true;
  return out;
}

NamedTensors lora_from_peft(const NamedTensors& file, const PeftConfig& cfg, const std::string& source) {
  const auto parts = qkv_parts(cfg.qkv_parts);
  if (parts.empty()) return file;
  std::map<std::string, torch::Tensor> by_name(file.begin(), file.end());
  NamedTensors out;
  for (const auto& [name, t] : file) {
    // ShardTune puts q/k/v pairs on a fused qkv only ("blocks.N.attn.qkv").
    auto on_qkv = [&](const std::string& tail) {
      const std::string end = ".attn.qkv" + tail;
      return name.size() > end.size() && name.compare(name.size() - end.size(), end.size(), end) == 0;
    };
    if (on_qkv(".lora_B.weight")) continue;  // with its A
    if (!on_qkv(".lora_A.weight")) {
      out.emplace_back(name, t);
      continue;
    }
    const std::string path = name.substr(0, name.size() - std::string(".lora_A.weight").size());
    auto it = by_name.find(path + ".lora_B.weight");
    if (it == by_name.end()) throw std::runtime_error(source + ": " + path + ".lora_A.weight has no lora_B beside it");
    const torch::Tensor& A = t;
    torch::Tensor B = it->second.clone();
    const int64_t p = static_cast<int64_t>(parts.size());
    if (A.dim() != 2 || B.dim() != 2 || A.size(0) % p != 0 || B.size(1) != A.size(0) || B.size(0) % 3 != 0)
      throw std::runtime_error(source + ": " + path + ": lora_A " + std::to_string(A.size(0)) + " rows and lora_B " +
                               std::to_string(B.size(0)) + "x" + std::to_string(B.size(1)) + " are not " +
                               std::to_string(p) + " stacked q/k/v pairs (peft.qkv_parts=" + cfg.qkv_parts + ")");
    const int64_t r = A.size(0) / p, rows = B.size(0) / 3;
    int64_t j = 0;
    for (const auto& [part, index] : parts) {
      out.emplace_back(path + ".lora_A_" + part + ".weight", A.narrow(0, j * r, r).clone());
      torch::Tensor block = B.narrow(0, index * rows, rows).narrow(1, j * r, r);
      out.emplace_back(path + ".lora_B_" + part + ".weight", block.clone());
      block.zero_();
      ++j;
    }
    if (B.count_nonzero().item<int64_t>() != 0)
      throw std::runtime_error(source + ": " + path + ".lora_B.weight has non-zero entries outside the " +
                               cfg.qkv_parts +
                               " blocks, so it is not the stacked pairs ShardTune wrote; to load it as a plain PEFT "
                               "LoRA on the whole qkv, delete the \"shardtune\" section of adapter_config.json");
  }
  return out;
}

PeftConfig peft_lora_config(const json::Json& v, const std::string& source) {
  auto bad = [&](const std::string& key, const std::string& why) -> std::invalid_argument {
    return std::invalid_argument(source + ": " + key + "=" + json::dump(v[key]) + ": " + why);
  };
  auto has = [&](const char* key) { return v.contains(key) && !v[key].is_null(); };
  const std::string type = has("peft_type") && v["peft_type"].is_string() ? v["peft_type"].get<std::string>() : "";
  if (type != "LORA")
    throw std::invalid_argument(source + ": peft_type=" + (v.contains("peft_type") ? json::dump(v["peft_type"]) : "missing") +
                                ": only Hugging Face PEFT LoRA adapters (\"LORA\") load into ShardTune");
  PeftConfig c;
  c.method = "lora";
  c.qkv_parts = "all";  // PEFT's LoRA on qkv covers all of its rows
  c.alpha = 8;          // LoraConfig's defaults
  c.rank = 8;
  const char* key = "";
  try {
    if (has(key = "r")) c.rank = json::to_int64(v[key]);
    if (has(key = "lora_alpha")) c.alpha = json::to_double(v[key]);
    if (has(key = "lora_dropout")) c.dropout = json::to_double(v[key]);
    if (has(key = "use_rslora")) c.rslora = json::to_bool(v[key]);
    for (const char* pattern : {"rank_pattern", "alpha_pattern"})
      if (has(key = pattern) && !v[key].is_object()) throw std::runtime_error("expected an object of module pattern -> value");
    if (has(key = "rank_pattern"))
      for (const auto& [k, r] : v[key].items()) c.rank_pattern.emplace_back(k, json::to_int64(r));
    if (has(key = "alpha_pattern"))
      for (const auto& [k, a] : v[key].items()) c.alpha_pattern.emplace_back(k, json::to_double(a));
  } catch (const std::exception& e) {
    throw bad(key, e.what());
  }
  if (c.rank <= 0) throw bad("r", "the rank must be positive");

  // target_modules: a list (exact names or '.'-suffixes), a regex string, or "all-linear".
  auto modules = [&](const char* k) -> std::string {
    const json::Json& t = v[k];
    if (t.is_string()) {
      const std::string s = t.get<std::string>();
      return s == "all-linear" ? "attn.qkv,attn.proj,mlp.fc1,mlp.fc2" : "re:" + s;
    }
    if (!t.is_array() || t.empty()) throw bad(k, "expected a list of module names or a regex string");
    std::string joined;
    for (const auto& m : t) {
      if (!m.is_string() || m.get<std::string>().find(',') != std::string::npos) throw bad(k, "not a list of module names");
      joined += (joined.empty() ? "" : ",") + m.get<std::string>();
    }
    return joined;
  };
  if (!has("target_modules")) throw std::invalid_argument(source + ": target_modules is missing: name the modules the LoRA is on");
  c.targets = modules("target_modules");
  if (has("exclude_modules")) c.exclude = modules("exclude_modules");

  // What ShardTune's LoRA cannot honour: an error, never a silently different model.
  if (has("use_dora") && v["use_dora"] != false) throw bad("use_dora", "DoRA is not supported (plain LoRA only)");
  if (has("bias") && v["bias"] != "none")
    throw bad("bias", "only \"none\" is supported (ShardTune's LoRA trains no biases; BitFit is peft.method=bitfit)");
  if (has("fan_in_fan_out") && v["fan_in_fan_out"] != false)
    throw bad("fan_in_fan_out", "a timm ViT's layers are nn.Linear (weight [out, in]); true is for GPT-2's Conv1D");
  if (has("layers_to_transform")) throw bad("layers_to_transform", "not supported: list the blocks in target_modules");
  if (has("layer_replication")) throw bad("layer_replication", "not supported");
  if (has("lora_bias") && v["lora_bias"] != false) throw bad("lora_bias", "not supported");
  if (has("target_parameters") && !v["target_parameters"].empty()) throw bad("target_parameters", "not supported");
  if (has("use_qalora") && v["use_qalora"] != false) throw bad("use_qalora", "not supported");
  // Initialisations that leave standard LoRA weights; PiSSA, OLoRA, CorDA, LoftQ change the base
  // weights as well, which a file of A and B alone cannot carry.
  if (has("init_lora_weights") && v["init_lora_weights"] != true && v["init_lora_weights"] != false &&
      v["init_lora_weights"] != "gaussian" && v["init_lora_weights"] != "eva")
    throw bad("init_lora_weights", "this initialisation also changes the base weights, which the adapter does not hold "
                                   "(convert it to a plain LoRA with PEFT first)");
  c.train_head = false;
  if (has("modules_to_save")) {
    const json::Json& m = v["modules_to_save"];
    if (!m.is_array()) throw bad("modules_to_save", "expected a list");
    for (const auto& name : m) {
      if (name != "head")
        throw bad("modules_to_save", "only the classifier head (\"head\") can be saved whole beside a LoRA");
      c.train_head = true;
    }
  }
  return c;
}

}  // namespace shardtune
