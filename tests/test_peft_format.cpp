// LoRA in Hugging Face PEFT's format (peft/lora/peft_format.h): the exported file applied with
// PEFT's semantics in this test (W + scaling B A from the file and its config alone) gives the
// model's logits; stacking and splitting q/k/v pairs is exact; per-module rank/alpha follow
// PEFT's key match; what cannot be honoured is refused naming the key; malformed JSON in each
// kind of file names the file.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <regex>

#include "models/checkpoint.h"
#include "models/vit.h"
#include "peft/adapter_io.h"
#include "peft/lora/lora.h"
#include "peft/lora/peft_format.h"
#include "peft/method.h"
#include "tests/tiny.h"
#include "trainer/checkpoint.h"

using namespace shardtune;

namespace {

std::string scratch(const std::string& name) {
  const std::string d = ::testing::TempDir() + "peft_format_" + std::to_string(::getpid()) + "_" + name;
  std::filesystem::remove_all(d);
  std::filesystem::create_directories(d);
  return d;
}

VisionTransformer make(const ViTConfig& c) {
  torch::manual_seed(1);
  return VisionTransformer(c);
}

void perturb(PeftState& s) {
  torch::NoGradGuard g;
  torch::manual_seed(9);
  for (auto& [_, t] : s.trainable) t.add_(torch::randn_like(t) * 0.2);
}

// The logits of the plain backbone with the adapter in `dir` folded in as PEFT folds it:
// W += lora_alpha' / r' * B A for every pair (r', alpha' from rank_pattern / alpha_pattern by
// PEFT's regex, "(.*\.)?(key)$"), the head from modules_to_save.
torch::Tensor logits_the_peft_way(const ViTConfig& c, const std::string& dir, const torch::Tensor& x) {
  nlohmann::json cfg;
  std::ifstream(dir + "/adapter_config.json") >> cfg;
  auto pattern = [&](const char* key, const std::string& module, double fallback) {
    for (auto it = cfg[key].begin(); it != cfg[key].end(); ++it)
      if (std::regex_match(module, std::regex("(.*\\.)?(" + it.key() + ")"))) return it->get<double>();
    return fallback;
  };
  VisionTransformer m = make(c);
  std::map<std::string, torch::Tensor> params;
  for (auto& p : m->named_parameters()) params[p.key()] = p.value();
  CheckpointReader file(dir + "/adapter_model.safetensors");
  torch::NoGradGuard g;
  for (const auto& key : file.names()) {
    const std::string name = key.substr(std::string("base_model.model.").size());
    const size_t at = name.find(".lora_A.weight");
    if (name.find(".lora_B.weight") != std::string::npos) continue;
    if (at == std::string::npos) {
      params.at(name).copy_(file.read(key));  // modules_to_save
      continue;
    }
    const std::string module = name.substr(0, at);
    const double r = pattern("rank_pattern", module, cfg["r"].get<double>());
    const double alpha = pattern("alpha_pattern", module, cfg["lora_alpha"].get<double>());
    const double scaling = alpha / (cfg["use_rslora"].get<bool>() ? std::sqrt(r) : r);
    torch::Tensor A = file.read(key, torch::kFloat64), B = file.read("base_model.model." + module + ".lora_B.weight", torch::kFloat64);
    EXPECT_EQ(A.size(0), static_cast<int64_t>(r)) << module;
    params.at(module + ".weight").add_((B.mm(A) * scaling).to(torch::kFloat32));
  }
  m->eval();
  return m->forward(x);
}

double max_rel(const torch::Tensor& a, const torch::Tensor& b) {
  return ((a - b).abs().max() / b.abs().max()).item<double>();
}

}  // namespace

struct ExportCase {
  const char* name;
  PeftConfig peft;
};

TEST(PeftFormat, ExportedLoraAppliedThePeftWayGivesTheModelsLogits) {
  const ViTConfig c = tiny_config();
  std::vector<ExportCase> cases;
  PeftConfig qv;
  qv.method = "lora";
  cases.push_back({"q,v", qv});
  PeftConfig qkv = qv;
  qkv.qkv_parts = "q,k,v";
  qkv.rslora = true;
  qkv.targets = "attn.qkv,mlp.fc1,attn.proj";
  qkv.rank_pattern = {{"fc1", 2}, {"1.attn.proj", 3}};
  qkv.alpha_pattern = {{"qkv", 4}, {"0.attn.qkv", 5}};  // overlapping: the first wins, also after a save
  cases.push_back({"q,k,v rslora patterns", qkv});
  PeftConfig all = qv;
  all.qkv_parts = "all";
  all.alpha = 32;
  cases.push_back({"all", all});
  PeftConfig v_only = qv;
  v_only.qkv_parts = "v";
  v_only.train_head = false;
  v_only.dropout = 0.1;
  cases.push_back({"v, no head", v_only});
  torch::manual_seed(4);
  const torch::Tensor x = torch::randn({3, 1, 28, 28});
  for (const auto& [what, p] : cases) {
    VisionTransformer m = make(c);
    PeftState s = apply_peft(*m, p);
    perturb(s);
    const std::string dir = scratch("export");
    save_adapter(dir, s, p, c);
    m->eval();
    torch::NoGradGuard g;
    EXPECT_LT(max_rel(m->forward(x), logits_the_peft_way(c, dir, x)), 1e-5) << what;

    // ... and reads back into ShardTune's own pairs exactly.
    VisionTransformer back = make(c);
    const AdapterConfig read = read_adapter_config(dir);
    EXPECT_EQ(read.format, kAdapterFormatVersion);
    PeftState sb = apply_peft(*back, read.peft);
    load_adapter_weights(dir, sb);
    ASSERT_EQ(sb.trainable.size(), s.trainable.size()) << what;
    for (size_t i = 0; i < s.trainable.size(); ++i)
      EXPECT_TRUE(torch::equal(sb.trainable[i].second, s.trainable[i].second)) << what << ": " << s.trainable[i].first;
    back->eval();
    EXPECT_TRUE(torch::equal(back->forward(x), m->forward(x))) << what;
  }
}

TEST(PeftFormat, StackedQvPairsAreRankTwoRWithAlphaDoubled) {
  const ViTConfig c = tiny_config();
  PeftConfig p;
  p.method = "lora";
  p.rank = 4;
  p.alpha = 6;
  VisionTransformer m = make(c);
  PeftState s = apply_peft(*m, p);
  perturb(s);
  nlohmann::json cfg;
  const NamedTensors out = lora_to_peft(s.trainable, p, c, cfg);
  EXPECT_EQ(cfg["r"], 8);
  EXPECT_EQ(cfg["lora_alpha"], 12.0);  // 12 / 8 = 6 / 4
  EXPECT_EQ(cfg["target_modules"], nlohmann::json({"attn.qkv"}));
  EXPECT_EQ(cfg["modules_to_save"], nlohmann::json({"head"}));
  std::map<std::string, torch::Tensor> t(out.begin(), out.end());
  std::map<std::string, torch::Tensor> own(s.trainable.begin(), s.trainable.end());
  const torch::Tensor A = t.at("blocks.1.attn.qkv.lora_A.weight"), B = t.at("blocks.1.attn.qkv.lora_B.weight");
  ASSERT_EQ(A.sizes(), (std::vector<int64_t>{8, 32}));
  ASSERT_EQ(B.sizes(), (std::vector<int64_t>{96, 8}));
  EXPECT_TRUE(torch::equal(A.narrow(0, 0, 4), own.at("blocks.1.attn.qkv.lora_A_q.weight")));
  EXPECT_TRUE(torch::equal(A.narrow(0, 4, 4), own.at("blocks.1.attn.qkv.lora_A_v.weight")));
  EXPECT_TRUE(torch::equal(B.narrow(0, 0, 32).narrow(1, 0, 4), own.at("blocks.1.attn.qkv.lora_B_q.weight")));
  EXPECT_TRUE(torch::equal(B.narrow(0, 64, 32).narrow(1, 4, 4), own.at("blocks.1.attn.qkv.lora_B_v.weight")));
  EXPECT_EQ(B.count_nonzero().item<int64_t>(), 2 * 32 * 4);  // zeros elsewhere: the k rows, the crossed blocks

  // A stacked pair changed outside its blocks is not ShardTune's: refused, naming the tensor.
  NamedTensors changed = out;
  for (auto& [name, v] : changed)
    if (name == "blocks.0.attn.qkv.lora_B.weight") v = v.clone(), v[40][1] = 1.0f;  // a k row
  try {
    lora_from_peft(changed, p, "X");
    FAIL();
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("X: blocks.0.attn.qkv.lora_B.weight has non-zero entries outside the q,v blocks"),
              std::string::npos)
        << e.what();
  }
}

TEST(PeftFormat, PatternKeysMatchAsPeftDoes) {
  EXPECT_TRUE(pattern_matches("attn.qkv", "blocks.3.attn.qkv"));
  EXPECT_TRUE(pattern_matches("qkv", "blocks.3.attn.qkv"));
  EXPECT_TRUE(pattern_matches("3.attn.qkv", "blocks.3.attn.qkv"));
  EXPECT_FALSE(pattern_matches("3.attn.qkv", "blocks.13.attn.qkv"));
  EXPECT_FALSE(pattern_matches("kv", "blocks.3.attn.qkv"));  // a whole '.'-separated suffix
  EXPECT_TRUE(pattern_matches("blocks.3.attn.qkv", "blocks.3.attn.qkv"));
  EXPECT_TRUE(pattern_matches("fc\\d", "blocks.0.mlp.fc2"));
  PeftConfig p;
  p.rank = 8;
  p.alpha = 16;
  p.rank_pattern = {{"fc1", 4}, {"mlp.fc1", 2}};  // the first match wins
  p.alpha_pattern = {{"2.mlp.fc1", 3}};
  EXPECT_EQ(lora_shape(p, "blocks.2.mlp.fc1").rank, 4);
  EXPECT_DOUBLE_EQ(lora_shape(p, "blocks.2.mlp.fc1").scaling, 3.0 / 4);
  EXPECT_DOUBLE_EQ(lora_shape(p, "blocks.1.mlp.fc1").scaling, 16.0 / 4);
  EXPECT_DOUBLE_EQ(lora_shape(p, "blocks.1.attn.qkv").scaling, 2.0);
  p.rslora = true;
  EXPECT_DOUBLE_EQ(lora_shape(p, "blocks.1.attn.qkv").scaling, 16.0 / std::sqrt(8.0));
  p.rank_pattern = {{"qkv(", 4}};
  EXPECT_THROW(lora_shape(p, "blocks.1.attn.qkv"), std::invalid_argument);
}

// A PEFT-made config: what it says becomes [peft] keys; what cannot be honoured is refused.
nlohmann::json peft_made() {
  return {{"peft_type", "LORA"}, {"r", 4}, {"lora_alpha", 16}, {"lora_dropout", 0.05}, {"target_modules", {"qkv", "mlp.fc1"}},
          {"rank_pattern", {{"fc1", 2}}}, {"alpha_pattern", {{"0.attn.qkv", 4}}}, {"use_rslora", true},
          {"modules_to_save", {"head"}}, {"bias", "none"}, {"use_dora", false}, {"fan_in_fan_out", false},
          {"layers_to_transform", nullptr}, {"megatron_config", nullptr}, {"peft_version", "0.17.0"}};
}

TEST(PeftFormat, APeftMadeConfigBecomesPeftKeys) {
  PeftConfig p = peft_lora_config(json::Json(peft_made()), "F");
  EXPECT_EQ(p.method, "lora");
  EXPECT_EQ(p.qkv_parts, "all");
  EXPECT_EQ(p.targets, "qkv,mlp.fc1");
  EXPECT_EQ(p.rank, 4);
  EXPECT_DOUBLE_EQ(p.alpha, 16);
  EXPECT_DOUBLE_EQ(p.dropout, 0.05);
  EXPECT_TRUE(p.rslora);
  EXPECT_TRUE(p.train_head);
  EXPECT_EQ(p.rank_pattern, (std::vector<std::pair<std::string, int64_t>>{{"fc1", 2}}));
  EXPECT_EQ(p.alpha_pattern, (std::vector<std::pair<std::string, double>>{{"0.attn.qkv", 4.0}}));
  nlohmann::json regex = peft_made();
  regex["target_modules"] = R"(.*\.mlp\.fc\d)";
  regex["exclude_modules"] = {"blocks.0.mlp.fc2"};
  regex["modules_to_save"] = nullptr;
  p = peft_lora_config(json::Json(regex), "F");
  EXPECT_EQ(p.targets, R"(re:.*\.mlp\.fc\d)");
  EXPECT_EQ(p.exclude, "blocks.0.mlp.fc2");
  EXPECT_FALSE(p.train_head);
  regex["target_modules"] = "all-linear";
  EXPECT_EQ(peft_lora_config(json::Json(regex), "F").targets, "attn.qkv,attn.proj,mlp.fc1,mlp.fc2");
}

struct Refused {
  const char* key;
  nlohmann::json value;
  const char* message;
};

TEST(PeftFormat, WhatCannotBeHonouredIsRefusedNamingTheKey) {
  const std::vector<Refused> cases = {
      {"peft_type", "IA3", "F: peft_type=\"IA3\": only Hugging Face PEFT LoRA adapters"},
      {"use_dora", true, "F: use_dora=true: DoRA is not supported"},
      {"bias", "all", "F: bias=\"all\": only \"none\" is supported"},
      {"bias", "lora_only", "F: bias=\"lora_only\": only \"none\""},
      {"fan_in_fan_out", true, "F: fan_in_fan_out=true: a timm ViT's layers are nn.Linear"},
      {"layers_to_transform", {0, 1}, "F: layers_to_transform=[0,1]: not supported"},
      {"layer_replication", {{0, 2}}, "F: layer_replication=[[0,2]]: not supported"},
      {"lora_bias", true, "F: lora_bias=true: not supported"},
      {"modules_to_save", {"norm"}, "F: modules_to_save=[\"norm\"]: only the classifier head"},
      {"target_modules", nullptr, "F: target_modules is missing"},
      {"target_modules", nlohmann::json::array(), "F: target_modules=[]: expected a list of module names"},
      {"r", 0, "F: r=0: the rank must be positive"},
      {"r", "8", "F: r=\"8\": \"8\" is not an integer"},
      {"use_rslora", 1, "F: use_rslora=1: 1 is not true or false"},
      {"rank_pattern", {"fc1", 2}, "F: rank_pattern=[\"fc1\",2]: expected an object"},
      {"init_lora_weights", "pissa", "F: init_lora_weights=\"pissa\": this initialisation also changes the base weights"},
  };
  for (const auto& [key, value, message] : cases) {
    nlohmann::json cfg = peft_made();
    cfg[key] = value;
    try {
      peft_lora_config(json::Json(cfg), "F");
      ADD_FAILURE() << key << " accepted";
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(message), std::string::npos) << key << ": " << e.what();
    }
  }
  // A target the model has but LoRA cannot wrap: named with what it is.
  PeftConfig p = peft_lora_config(json::Json(peft_made()), "F");
  p.targets = "norm1";
  VisionTransformer m = make(tiny_config());
  try {
    apply_peft(*m, p);
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("peft.targets=norm1 names blocks.0.norm1, which is not a Linear layer"),
              std::string::npos)
        << e.what();
  }
  p.targets = "head";
  VisionTransformer m2 = make(tiny_config());
  EXPECT_THROW(apply_peft(*m2, p), std::invalid_argument);
}

TEST(PeftFormat, MalformedJsonInEachKindOfFileNamesTheFile) {
  const std::string dir = scratch("malformed");
  std::ofstream(dir + "/adapter_config.json") << "{\"peft_type\": \"LORA\",,}";
  try {
    read_adapter_config(dir);
    FAIL();
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find(dir + "/adapter_config.json: malformed JSON: parse error"), std::string::npos)
        << e.what();
  }
  std::ofstream(dir + "/adapter_config.json") << R"({"peft_type": "LORA", "peft_type": "LORA"})";
  EXPECT_THROW(read_adapter_config(dir), std::runtime_error);
  std::ofstream(dir + "/adapter_config.json") << R"({"format": 3})";
  try {
    read_adapter_config(dir);
    FAIL();
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("adapter_config.json: neither a ShardTune adapter"), std::string::npos) << e.what();
  }
  std::ofstream(dir + "/adapter_config.json") << R"({"shardtune": {"format_version": 3}})";
  try {
    read_adapter_config(dir);
    FAIL();
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("adapter_config.json: shardtune.format_version=3 (this ShardTune reads 1 and 2)"),
              std::string::npos)
        << e.what();
  }
  // A checkpoint's manifest: verification names it.
  const std::string ckpt = scratch("ckpt");
  std::ofstream(ckpt + "/trainer_state.json") << R"({"step": 1})";
  std::ofstream(ckpt + "/manifest.json") << R"({"files": {"a": 1}, "files": {}})";
  const std::string why = verify_checkpoint(ckpt);
  EXPECT_NE(why.find(ckpt + "/manifest.json: "), std::string::npos) << why;
  EXPECT_NE(why.find("duplicate key \"files\""), std::string::npos) << why;
  // A checkpoint index.
  std::ofstream(dir + "/model.safetensors.index.json") << R"({"weight_map": {"a": "x"},})";
  try {
    CheckpointReader r(dir + "/model.safetensors.index.json");
    FAIL();
  } catch (const CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("model.safetensors.index.json: cannot read the checkpoint index"),
              std::string::npos)
        << e.what();
  }
}
