#include "peft/adapter_io.h"

#include <filesystem>
#include <stdexcept>

#include "io/atomic_file.h"
#include "models/checkpoint.h"
#include "peft/lora/peft_format.h"

namespace shardtune {

json::Json vit_config_to_json(const ViTConfig& c) {
  return {{"arch", c.arch},
          {"image_size", c.image_size},
          {"patch_size", c.patch_size},
          {"in_chans", c.in_chans},
          {"dim", c.dim},
          {"depth", c.depth},
          {"heads", c.heads},
          {"mlp_dim", c.mlp_dim},
          {"num_classes", c.num_classes},
          {"qkv_bias", c.qkv_bias},
          {"global_pool", c.global_pool},
          {"layer_scale", c.layer_scale},
          {"qk_norm", c.qk_norm}};
}

ViTConfig vit_config_from_json(const json::Json& v, const std::string& source) {
  ViTConfig c;
  try {
    c.arch = json::to_string(json::at(v, "arch"));
    c.image_size = json::to_int64(json::at(v, "image_size"));
    c.patch_size = json::to_int64(json::at(v, "patch_size"));
    c.in_chans = json::to_int64(json::at(v, "in_chans"));
    c.dim = json::to_int64(json::at(v, "dim"));
    c.depth = json::to_int64(json::at(v, "depth"));
    c.heads = json::to_int64(json::at(v, "heads"));
    c.mlp_dim = json::to_int64(json::at(v, "mlp_dim"));
    c.num_classes = json::to_int64(json::at(v, "num_classes"));
    c.qkv_bias = json::to_bool(json::at(v, "qkv_bias"));
    c.global_pool = json::to_string(json::at(v, "global_pool"));
    c.layer_scale = json::to_double(json::at(v, "layer_scale"));
    c.qk_norm = json::to_bool(json::at(v, "qk_norm"));
  } catch (const std::exception& e) {
    throw std::runtime_error(source + ": malformed \"base_model\": " + e.what());
  }
  return c;
}

void save_adapter(const std::string& dir, const PeftState& state, const PeftConfig& peft, const ViTConfig& model) {
  std::filesystem::create_directories(dir);
  nlohmann::json cfg = nlohmann::json::object();  // sorted keys, as PEFT writes its configs
  const NamedTensors tensors = peft.method == "lora" ? lora_to_peft(state.trainable, peft, model, cfg) : state.trainable;
  std::vector<std::pair<std::string, torch::Tensor>> keyed;
  for (const auto& [name, t] : tensors) keyed.emplace_back(kAdapterKeyPrefix + name, t);
  save_tensors(dir + "/adapter_model.safetensors", keyed, {{"format", "pt"}});

  std::vector<std::string> names;
  for (const auto& [name, _] : state.trainable) names.push_back(name);
  cfg["shardtune"] = {{"format_version", kAdapterFormatVersion},
                      {"method", peft.method},
                      {"peft", peft.to_json()},
                      {"base_model", vit_config_to_json(model)},
                      {"trainable_tensors", names}};
  io::write_text_atomically(dir + "/adapter_config.json", json::dump(cfg, 2) + "\n");
}

AdapterConfig read_adapter_config(const std::string& dir) {
  const std::string path = dir + "/adapter_config.json";
  const json::Json v = json::read_file(path);  // keeps the file's key order (PEFT's pattern keys)
  if (!v.is_object()) throw std::runtime_error(path + ": not a JSON object");
  AdapterConfig a;
  try {
    if (v.contains("shardtune")) {
      const json::Json& st = v["shardtune"];
      const json::Json& version = json::at(st, "format_version");
      a.format = static_cast<int>(json::to_int64(version));
      if (a.format != kAdapterFormatVersion)
        throw std::runtime_error("shardtune.format_version=" + json::dump(version) + " (this ShardTune reads 1 and " +
                                 std::to_string(kAdapterFormatVersion) + ")");
      a.peft = PeftConfig::from_json(json::at(st, "peft"), path);
      a.model = vit_config_from_json(json::at(st, "base_model"), path);
    } else if (v.contains("peft_type")) {  // made by Hugging Face PEFT
      a.format = 0;
      a.peft = peft_lora_config(v, path);
    } else if (v.contains("method")) {  // format 1
      a.format = 1;
      a.peft = PeftConfig::from_json(v, path);
      a.model = vit_config_from_json(json::at(v, "base_model"), path);
    } else {
      throw std::runtime_error(
          "neither a ShardTune adapter (a \"shardtune\" section) nor a Hugging Face PEFT one (\"peft_type\")");
    }
  } catch (const std::invalid_argument&) {  // what cannot be honoured: a usage error that names the file
    throw;
  } catch (const std::runtime_error& e) {
    const std::string what = e.what();
    throw std::runtime_error(what.rfind(path, 0) == 0 ? what : path + ": " + what);
  }
  return a;
}

void check_adapter_fits(const AdapterConfig& adapter, const ViTConfig& model, const std::string& dir) {
  if (!adapter.model) return;
  const json::Json a = vit_config_to_json(*adapter.model), m = vit_config_to_json(model);
  std::string diffs;
  for (const auto& [key, value] : a.items()) {
    if (key == "arch") continue;  // presets and explicit dims may describe the same shape
    if (value != m[key])
      diffs += (diffs.empty() ? "" : "; ") + ("model." + key + ": adapter " + json::dump(value) + ", model " + json::dump(m[key]));
  }
  if (!diffs.empty())
    throw std::runtime_error(dir + "/adapter_config.json: the adapter was made for another backbone: " + diffs);
}

PeftConfig peft_for_init(const PeftConfig& run, const AdapterConfig& adapter) {
  if (run.method != "none" && run.method != adapter.peft.method)
    throw std::invalid_argument("peft.method=" + run.method + " but peft.init_adapter=" + run.init_adapter + " is a " +
                                adapter.peft.method + " adapter (leave peft.method out, or make them agree)");
  PeftConfig p = adapter.peft;  // the method and its shape come from the adapter
  p.init_adapter = run.init_adapter;
  p.dropout = run.dropout;  // how to train is the run's
  p.train_head = adapter.peft.train_head || run.train_head;  // a head the adapter lacks starts from its init
  return p;
}

void load_adapter_weights(const std::string& dir, const PeftState& all, const KeyFilter& elsewhere) {
  const std::string file = dir + "/adapter_model.safetensors";
  CheckpointReader reader(file);
  const AdapterConfig cfg = read_adapter_config(dir);
  // A trained head that the adapter does not hold (peft.init_adapter from one without
  // modules_to_save) keeps its initialisation.
  PeftState state;
  for (const auto& [name, t] : all.trainable)
    if (cfg.peft.train_head || name.rfind("head.", 0) != 0) state.trainable.emplace_back(name, t);
  torch::NoGradGuard no_grad;
  if (cfg.format == kAdapterFormatVersion && cfg.peft.method == "lora" && cfg.peft.qkv_parts != "all") {
    // PEFT's stacked qkv pairs back to ShardTune's q/k/v pairs: small tensors, read whole.
    NamedTensors in_file;
    const size_t prefix = std::string(kAdapterKeyPrefix).size();
    for (const auto& key : reader.names()) {
      if (key.rfind(kAdapterKeyPrefix, 0) != 0) throw CheckpointError(file + ": key " + key + " lacks the " + kAdapterKeyPrefix + " prefix");
      in_file.emplace_back(key.substr(prefix), reader.read(key, torch::kFloat32));
    }
    std::map<std::string, std::vector<int64_t>> found;
    std::map<std::string, torch::Tensor> by_key;
    for (const auto& [name, t] : lora_from_peft(in_file, cfg.peft, file)) {
      found[kAdapterKeyPrefix + name] = t.sizes().vec();
      by_key[kAdapterKeyPrefix + name] = t;
    }
    check_fits(shapes_of(state.trainable), found, file, kAdapterKeyPrefix, "", elsewhere);
    for (auto [name, t] : state.trainable) t.copy_(by_key.at(kAdapterKeyPrefix + name));
    return;
  }
  check_fits(shapes_of(state.trainable), reader, kAdapterKeyPrefix, "", elsewhere);
  for (auto [name, t] : state.trainable) t.copy_(reader.read(kAdapterKeyPrefix + name, t.scalar_type()));
}

}  // namespace shardtune
