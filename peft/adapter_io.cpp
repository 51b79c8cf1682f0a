#include "peft/adapter_io.h"

#include <filesystem>
#include <stdexcept>

#include "io/atomic_file.h"
#include "models/checkpoint.h"

namespace shardtune {

json::Value vit_config_to_json(const ViTConfig& c) {
  json::Value v;
  v.set("arch", c.arch);
  v.set("image_size", c.image_size);
  v.set("patch_size", c.patch_size);
  v.set("in_chans", c.in_chans);
  v.set("dim", c.dim);
  v.set("depth", c.depth);
  v.set("heads", c.heads);
  v.set("mlp_dim", c.mlp_dim);
  v.set("num_classes", c.num_classes);
  v.set("qkv_bias", c.qkv_bias);
  v.set("global_pool", c.global_pool);
  v.set("layer_scale", c.layer_scale);
  v.set("qk_norm", c.qk_norm);
  return v;
}

ViTConfig vit_config_from_json(const json::Value& v, const std::string& source) {
  ViTConfig c;
  try {
    c.arch = v.at("arch").as_string();
    c.image_size = v.at("image_size").as_int64();
    c.patch_size = v.at("patch_size").as_int64();
    c.in_chans = v.at("in_chans").as_int64();
    c.dim = v.at("dim").as_int64();
    c.depth = v.at("depth").as_int64();
    c.heads = v.at("heads").as_int64();
    c.mlp_dim = v.at("mlp_dim").as_int64();
    c.num_classes = v.at("num_classes").as_int64();
    c.qkv_bias = v.at("qkv_bias").as_bool();
    c.global_pool = v.at("global_pool").as_string();
    c.layer_scale = v.at("layer_scale").as_double();
    c.qk_norm = v.at("qk_norm").as_bool();
  } catch (const std::exception& e) {
    throw std::runtime_error(source + ": malformed \"base_model\": " + e.what());
  }
  return c;
}

void save_adapter(const std::string& dir, const PeftState& state, const PeftConfig& peft, const ViTConfig& model) {
  std::filesystem::create_directories(dir);
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  for (const auto& [name, t] : state.trainable) tensors.emplace_back(kAdapterKeyPrefix + name, t);
  save_tensors(dir + "/adapter_model.safetensors", tensors, {{"format", "pt"}, {"method", peft.method}});

  json::Value cfg = peft.to_json();
  json::Value::Array names;
  for (const auto& [name, _] : state.trainable) names.emplace_back(name);
  cfg.set("trainable_tensors", json::Value(names));
  cfg.set("base_model", vit_config_to_json(model));
  io::write_text_atomically(dir + "/adapter_config.json", cfg.dump(2) + "\n");
}

AdapterConfig read_adapter_config(const std::string& dir) {
  const std::string path = dir + "/adapter_config.json";
  json::Value v;
  try {
    v = json::parse(io::read_text(path));
  } catch (const std::exception& e) {
    throw std::runtime_error(path + ": " + e.what());
  }
  AdapterConfig a;
  try {
    a.peft = PeftConfig::from_json(v, path);
  } catch (const std::invalid_argument& e) {
    throw std::runtime_error(e.what());
  }
  const json::Value* base = v.is_object() ? v.find("base_model") : nullptr;
  if (!base) throw std::runtime_error(path + ": missing \"base_model\"");
  a.model = vit_config_from_json(*base, path);
  return a;
}

void check_adapter_fits(const AdapterConfig& adapter, const ViTConfig& model, const std::string& dir) {
  json::Value a = vit_config_to_json(adapter.model), m = vit_config_to_json(model);
  std::string diffs;
  for (const auto& [key, value] : a.as_object()) {
    if (key == "arch") continue;  // presets and explicit dims may describe the same shape
    if (value.dump() != m.at(key).dump())
      diffs += (diffs.empty() ? "" : "; ") + ("model." + key + ": adapter " + value.dump() + ", model " + m.at(key).dump());
  }
  if (!diffs.empty())
    throw std::runtime_error(dir + "/adapter_config.json: the adapter was made for another backbone: " + diffs);
}

void load_adapter_weights(const std::string& dir, const PeftState& state, const KeyFilter& elsewhere) {
  CheckpointReader reader(dir + "/adapter_model.safetensors");
  check_fits(shapes_of(state.trainable), reader, kAdapterKeyPrefix, "", elsewhere);
  torch::NoGradGuard no_grad;
  for (auto [name, t] : state.trainable) t.copy_(reader.read(kAdapterKeyPrefix + name, t.scalar_type()));
}

}  // namespace shardtune
