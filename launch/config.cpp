#include "launch/config.h"

#include <boost/program_options/parsers.hpp>
#include <boost/program_options/value_semantic.hpp>

#include <fstream>
#include <sstream>

namespace shardtune {

namespace po = boost::program_options;

po::options_description config_key_options() {
  po::options_description d("Config keys (INI [section] key = value, or --section.key VALUE)");
  // clang-format off
  d.add_options()
    ("model.arch", po::value<std::string>(), "preset (vit_tiny_patch16_224 ... vit_22b) or 'vit' for explicit dims")
    ("model.checkpoint", po::value<std::string>(), "backbone: .safetensors, model.safetensors.index.json or a directory")
    ("model.num_classes", po::value<int64_t>(), "classifier outputs (0: no head)")
    ("model.image_size", po::value<int64_t>(), "input height = width, pixels")
    ("model.in_chans", po::value<int64_t>(), "input channels")
    ("model.patch_size", po::value<int64_t>(), "patch height = width")
    ("model.dim", po::value<int64_t>(), "token width")
    ("model.depth", po::value<int64_t>(), "number of blocks")
    ("model.heads", po::value<int64_t>(), "attention heads")
    ("model.mlp_dim", po::value<int64_t>(), "MLP hidden width")
    ("model.qkv_bias", po::value<bool>(), "bias on attn.qkv (true|false)")
    ("model.global_pool", po::value<std::string>(), "token | avg")
    ("model.layer_scale", po::value<double>(), "layer-scale init value, 0 = none")
    ("model.qk_norm", po::value<bool>(), "LayerNorm on q and k (true|false)")
    ("peft.method", po::value<std::string>(), "lora adapter adaptformer vpt_shallow vpt_deep prefix bitfit ln_tune ssf fact_tt linear full none")
    ("peft.targets", po::value<std::string>(), "modules: 'a,b' (exact or .suffix) or 're:<regex>'; default per method")
    ("peft.exclude", po::value<std::string>(), "modules to leave out, same syntax")
    ("peft.qkv_parts", po::value<std::string>(), "LoRA on fused attn.qkv: parts among q,k,v (default q,v)")
    ("peft.rank", po::value<int64_t>(), "LoRA / FacT rank (default 8)")
    ("peft.alpha", po::value<double>(), "LoRA alpha; scaling = alpha / rank (default 8)")
    ("peft.dropout", po::value<double>(), "LoRA input dropout (default 0)")
    ("peft.bottleneck", po::value<int64_t>(), "adapter / adaptformer width (default 8)")
    ("peft.prompt_len", po::value<int64_t>(), "VPT / prefix tokens (default 10)")
    ("peft.scale", po::value<double>(), "adaptformer output scale (0.1) / FacT scale (1)")
    ("peft.train_head", po::value<bool>(), "train the classifier head (default true)")
    ("train.seed", po::value<uint64_t>(), "seed for initialisation");
  // clang-format on
  return d;
}

void parse_command_line(const std::vector<std::string>& args, const po::options_description& command_options,
                        po::variables_map& vm) {
  po::options_description keys = config_key_options();
  po::options_description all;
  all.add(command_options).add(keys);
  try {
    po::store(po::command_line_parser(args).options(all).run(), vm);
  } catch (const po::error& e) {
    throw UsageError(e.what());
  }
  if (vm.count("config")) {
    const std::string file = vm["config"].as<std::string>();
    std::ifstream in(file);
    if (!in) throw UsageError("--config " + file + ": cannot open the file");
    try {
      po::store(po::parse_config_file(in, keys, /*allow_unregistered=*/false), vm);  // the command line wins
    } catch (const po::error& e) {
      throw UsageError(file + ": " + e.what());
    }
  }
  try {
    po::notify(vm);
  } catch (const po::error& e) {
    throw UsageError(e.what());
  }
}

RunConfig run_config_from(const po::variables_map& vm) {
  RunConfig rc;
  auto has = [&](const char* k) { return vm.count(k) > 0; };
  std::string arch = has("model.arch") ? vm["model.arch"].as<std::string>() : "vit";
  try {
    rc.model = arch == "vit" ? ViTConfig{} : vit_preset(arch);
  } catch (const std::invalid_argument& e) {
    throw UsageError(e.what());
  }
  rc.model.arch = arch;
  auto set_i = [&](const char* k, int64_t& field) {
    if (has(k)) field = vm[k].as<int64_t>();
  };
  set_i("model.num_classes", rc.model.num_classes);
  set_i("model.image_size", rc.model.image_size);
  set_i("model.in_chans", rc.model.in_chans);
  set_i("model.patch_size", rc.model.patch_size);
  set_i("model.dim", rc.model.dim);
  set_i("model.depth", rc.model.depth);
  set_i("model.heads", rc.model.heads);
  set_i("model.mlp_dim", rc.model.mlp_dim);
  if (has("model.qkv_bias")) rc.model.qkv_bias = vm["model.qkv_bias"].as<bool>();
  if (has("model.global_pool")) rc.model.global_pool = vm["model.global_pool"].as<std::string>();
  if (has("model.layer_scale")) rc.model.layer_scale = vm["model.layer_scale"].as<double>();
  if (has("model.qk_norm")) rc.model.qk_norm = vm["model.qk_norm"].as<bool>();
  if (has("model.checkpoint")) rc.checkpoint = vm["model.checkpoint"].as<std::string>();
  if (has("train.seed")) rc.seed = vm["train.seed"].as<uint64_t>();
  auto str = [&](const char* k, std::string& field) {
    if (has(k)) field = vm[k].as<std::string>();
  };
  str("peft.method", rc.peft.method);
  str("peft.targets", rc.peft.targets);
  str("peft.exclude", rc.peft.exclude);
  str("peft.qkv_parts", rc.peft.qkv_parts);
  set_i("peft.rank", rc.peft.rank);
  set_i("peft.bottleneck", rc.peft.bottleneck);
  set_i("peft.prompt_len", rc.peft.prompt_len);
  if (has("peft.alpha")) rc.peft.alpha = vm["peft.alpha"].as<double>();
  if (has("peft.dropout")) rc.peft.dropout = vm["peft.dropout"].as<double>();
  if (has("peft.scale")) rc.peft.scale = vm["peft.scale"].as<double>();
  if (has("peft.train_head")) rc.peft.train_head = vm["peft.train_head"].as<bool>();
  try {
    rc.model.validate();
  } catch (const std::invalid_argument& e) {
    throw UsageError(e.what());
  }
  return rc;
}

std::string to_ini(const RunConfig& c) {
  std::ostringstream s;
  const ViTConfig& m = c.model;
  s << "[model]\narch = " << m.arch << "\nimage_size = " << m.image_size << "\nin_chans = " << m.in_chans
    << "\npatch_size = " << m.patch_size << "\ndim = " << m.dim << "\ndepth = " << m.depth << "\nheads = " << m.heads
    << "\nmlp_dim = " << m.mlp_dim << "\nnum_classes = " << m.num_classes
    << "\nqkv_bias = " << (m.qkv_bias ? "true" : "false") << "\nglobal_pool = " << m.global_pool
    << "\nlayer_scale = " << m.layer_scale << "\nqk_norm = " << (m.qk_norm ? "true" : "false") << "\n";
  if (!c.checkpoint.empty()) s << "checkpoint = " << c.checkpoint << "\n";
  const PeftConfig& p = c.peft;
  s << "\n[peft]\nmethod = " << p.method << "\n";
  if (!p.targets.empty()) s << "targets = " << p.targets << "\n";
  if (!p.exclude.empty()) s << "exclude = " << p.exclude << "\n";
  s << "qkv_parts = " << p.qkv_parts << "\nrank = " << p.rank << "\nalpha = " << p.alpha << "\ndropout = " << p.dropout
    << "\nbottleneck = " << p.bottleneck << "\nprompt_len = " << p.prompt_len << "\n";
  if (p.scale) s << "scale = " << *p.scale << "\n";
  s << "train_head = " << (p.train_head ? "true" : "false") << "\n";
  s << "\n[train]\nseed = " << c.seed << "\n";
  return s.str();
}

}  // namespace shardtune
