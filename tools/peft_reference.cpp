// The testkit's Hugging Face PEFT side, written from PEFT's documented semantics and sharing
// no code with ShardTune's LoRA (peft/lora/): what the tests compare ShardTune against.
//   make-peft-lora CONFIG.ini DIR SEED RSLORA list|regex
//       a LoRA adapter as PEFT saves one for a timm ViT: random A and B (r=4, lora_alpha=16)
//       on every block's attn.qkv and mlp.fc1, rank_pattern {"mlp.fc1": 2}, alpha_pattern
//       {"fc1": 8}, use_rslora RSLORA (0/1), a random head in modules_to_save, and the other
//       fields a recent PEFT writes; target_modules as a list or as a regex
//   peft-merge BACKBONE.safetensors ADAPTER_DIR OUT.safetensors
//       the backbone with the adapter folded in as PEFT computes it, from the two files alone:
//       W += scaling * B A for every lora pair (scaling = lora_alpha / r, or / sqrt(r) with
//       use_rslora; r and alpha from rank_pattern / alpha_pattern by PEFT's key match), each
//       module checked against target_modules; modules_to_save replace the backbone's tensors
#include <torch/torch.h>

#include <boost/program_options/options_description.hpp>
#include <boost/program_options/value_semantic.hpp>
#include <boost/program_options/variables_map.hpp>
#include <nlohmann/json.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <regex>
#include <string>

#include "launch/config.h"
#include "models/checkpoint.h"

using namespace shardtune;

namespace {

const std::string kPrefix = "base_model.model.";

// PEFT >= 0.15, utils/other.py get_pattern_key: re.match(rf"(.*\.)?({key})$", module).
const nlohmann::json* pattern_value(const nlohmann::json& patterns, const std::string& module) {
  for (auto it = patterns.begin(); it != patterns.end(); ++it)
    if (std::regex_match(module, std::regex("(.*\\.)?(" + it.key() + ")"))) return &*it;
  return nullptr;
}

// PEFT's check_target_module_exists: a string is re.fullmatch, a list matches exactly or as
// a ".suffix".
bool targeted(const nlohmann::json& targets, const std::string& module) {
  if (targets.is_string()) return std::regex_match(module, std::regex(targets.get<std::string>()));
  for (const auto& t : targets) {
    const std::string s = t.get<std::string>();
    if (module == s || (module.size() > s.size() && module.compare(module.size() - s.size() - 1, s.size() + 1, "." + s) == 0))
      return true;
  }
  return false;
}

}  // namespace

int make_peft_lora(char** a) {
  namespace po = boost::program_options;
  po::options_description opts;
  opts.add_options()("config", po::value<std::string>());
  po::variables_map vm;
  parse_command_line({"--config", a[0]}, opts, vm);
  const RunConfig rc = run_config_from(vm);
  const std::string dir = a[1], style = a[4];
  const bool rslora = std::string(a[3]) == "1";
  torch::manual_seed(std::stoull(a[2]));
  const int64_t d = rc.model.dim, m = rc.model.mlp_dim;
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  for (int64_t b = 0; b < rc.model.depth; ++b) {
    const std::string p = kPrefix + "blocks." + std::to_string(b) + ".";
    tensors.emplace_back(p + "attn.qkv.lora_A.weight", torch::randn({4, d}) * 0.2);
    tensors.emplace_back(p + "attn.qkv.lora_B.weight", torch::randn({3 * d, 4}) * 0.2);
    tensors.emplace_back(p + "mlp.fc1.lora_A.weight", torch::randn({2, d}) * 0.2);
    tensors.emplace_back(p + "mlp.fc1.lora_B.weight", torch::randn({m, 2}) * 0.2);
  }
  tensors.emplace_back(kPrefix + "head.weight", torch::randn({rc.model.num_classes, d}) * 0.2);
  tensors.emplace_back(kPrefix + "head.bias", torch::randn({rc.model.num_classes}) * 0.2);
  std::filesystem::create_directories(dir);
  save_tensors(dir + "/adapter_model.safetensors", tensors, {{"format", "pt"}});
  nlohmann::json cfg = {
      {"alpha_pattern", {{"fc1", 8}}},
      {"auto_mapping", nullptr},
      {"base_model_name_or_path", nullptr},
      {"bias", "none"},
      {"corda_config", nullptr},
      {"eva_config", nullptr},
      {"exclude_modules", nullptr},
      {"fan_in_fan_out", false},
      {"inference_mode", true},
      {"init_lora_weights", true},
      {"layer_replication", nullptr},
      {"layers_pattern", nullptr},
      {"layers_to_transform", nullptr},
      {"loftq_config", nlohmann::json::object()},
      {"lora_alpha", 16},
      {"lora_bias", false},
      {"lora_dropout", 0.1},
      {"megatron_config", nullptr},
      {"megatron_core", "megatron.core"},
      {"modules_to_save", {"head"}},
      {"peft_type", "LORA"},
      {"r", 4},
      {"rank_pattern", {{"mlp.fc1", 2}}},
      {"revision", nullptr},
      {"target_modules", style == "regex" ? nlohmann::json(R"(.*\.(qkv|fc1))") : nlohmann::json({"qkv", "mlp.fc1"})},
      {"task_type", nullptr},
      {"trainable_token_indices", nullptr},
      {"use_dora", false},
      {"use_rslora", rslora},
  };
  std::ofstream(dir + "/adapter_config.json") << cfg.dump(2, ' ', true) << "\n";
  std::cout << "wrote a PEFT LoRA adapter (" << style << " targets, use_rslora " << rslora << ") to " << dir << "\n";
  return 0;
}

int peft_merge(char** a) {
  const std::string dir = a[1];
  nlohmann::json cfg;
  std::ifstream(dir + "/adapter_config.json") >> cfg;
  if (cfg.at("peft_type") != "LORA") throw std::runtime_error("not a LoRA adapter");
  const double r_default = cfg.value("r", 8.0), alpha_default = cfg.value("lora_alpha", 8.0);
  const bool rslora = cfg.value("use_rslora", false);
  const nlohmann::json none = nlohmann::json::object();
  const nlohmann::json& ranks = cfg.contains("rank_pattern") ? cfg["rank_pattern"] : none;
  const nlohmann::json& alphas = cfg.contains("alpha_pattern") ? cfg["alpha_pattern"] : none;

  CheckpointReader backbone(a[0]), adapter(dir + "/adapter_model.safetensors");
  std::map<std::string, torch::Tensor> w;
  for (const auto& name : backbone.names()) w[name] = backbone.read(name, torch::kFloat64);
  int pairs = 0;
  for (const auto& key : adapter.names()) {
    if (key.rfind(kPrefix, 0) != 0) throw std::runtime_error(key + ": no " + kPrefix + " prefix");
    const std::string name = key.substr(kPrefix.size());
    const size_t at = name.find(".lora_A.weight");
    if (at == std::string::npos) {
      if (name.find(".lora_B.weight") != std::string::npos) continue;  // with its A
      const std::string module = name.substr(0, name.rfind('.'));
      bool saved = false;
      for (const auto& s : cfg.at("modules_to_save")) saved |= s.get<std::string>() == module;
      if (!saved || !w.count(name)) throw std::runtime_error(key + " is neither a LoRA pair nor in modules_to_save");
      w[name] = adapter.read(key, torch::kFloat64);
      continue;
    }
    const std::string module = name.substr(0, at);
    if (!targeted(cfg.at("target_modules"), module)) throw std::runtime_error(module + " is not in target_modules");
    const torch::Tensor A = adapter.read(key, torch::kFloat64);
    const torch::Tensor B = adapter.read(kPrefix + module + ".lora_B.weight", torch::kFloat64);
    const auto* rp = pattern_value(ranks, module);
    const auto* ap = pattern_value(alphas, module);
    const double r = rp ? rp->get<double>() : r_default, alpha = ap ? ap->get<double>() : alpha_default;
    if (A.size(0) != static_cast<int64_t>(r))
      throw std::runtime_error(module + ": lora_A has " + std::to_string(A.size(0)) + " rows, the config says r=" +
                               std::to_string(r));
    const double scaling = alpha / (rslora ? std::sqrt(r) : r);
    w.at(module + ".weight").add_(B.mm(A), scaling);
    ++pairs;
  }
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (auto& [name, t] : w) out.emplace_back(name, t.to(torch::kFloat32));
  save_tensors(a[2], out);
  std::cout << "merged " << pairs << " LoRA pairs into " << a[2] << "\n";
  return 0;
}
