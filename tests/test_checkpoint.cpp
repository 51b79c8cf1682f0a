// Checkpoints: a saved backbone loads back to the same logits (F32, and converted from
// F16/BF16), Hugging Face names map to timm's, sharded index files load, and a checkpoint
// that does not fit the model is rejected with every problem listed in one message.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <unistd.h>

#include <cstdio>
#include <fstream>

#include "io/strict_json.h"
#include "models/checkpoint.h"
#include "models/vit.h"
#include "tests/tiny.h"
#include "trainer/checkpoint.h"

using namespace shardtune;

namespace {

std::string temp_path(const std::string& name) {
  return ::testing::TempDir() + "ckpt_" + std::to_string(::getpid()) + "_" + name;
}

VisionTransformer make_model(const ViTConfig& c, uint64_t seed) {
  torch::manual_seed(seed);
  VisionTransformer m(c);
  randomize_for_test(*m);
  m->eval();
  return m;
}

torch::Tensor logits_of(VisionTransformer& m, const torch::Tensor& x) {
  torch::NoGradGuard g;
  return m->forward(x);
}

std::string load_error(torch::nn::Module& m, const std::string& path) {
  try {
    load_state(m, CheckpointReader(path));
  } catch (const CheckpointError& e) {
    return e.what();
  }
  ADD_FAILURE() << "loaded " << path;
  return "";
}

}  // namespace

TEST(Checkpoint, RoundTripGivesTheSameLogits) {
  for (const ViTConfig& c : tiny_variants()) {
    VisionTransformer a = make_model(c, 1), b = make_model(c, 2);
    std::string path = temp_path("rt_" + describe(c) + ".safetensors");
    save_tensors(path, state_of(*a));
    load_state(*b, CheckpointReader(path));
    torch::Tensor x = torch::randn({2, c.in_chans, 28, 28});
    EXPECT_TRUE(torch::equal(logits_of(a, x), logits_of(b, x))) << describe(c);
  }
}

TEST(Checkpoint, HalfPrecisionFilesConvertOnLoad) {
  const ViTConfig c = tiny_config();
  VisionTransformer a = make_model(c, 1);
  for (auto dtype : {torch::kBFloat16, torch::kFloat16, torch::kFloat64}) {
    std::vector<std::pair<std::string, torch::Tensor>> state;
    for (auto& [k, v] : state_of(*a)) state.emplace_back(k, v.to(dtype));
    std::string path = temp_path(std::string("half_") + c10::toString(dtype) + ".safetensors");
    save_tensors(path, state);
    VisionTransformer b = make_model(c, 2);
    load_state(*b, CheckpointReader(path));
    for (auto& [k, v] : state_of(*b)) {
      EXPECT_EQ(v.scalar_type(), torch::kFloat32);
      EXPECT_TRUE(torch::equal(v, a->named_parameters()[k].to(dtype).to(torch::kFloat32))) << k;
    }
  }
}

TEST(Checkpoint, MismatchesAreReportedTogether) {
  ViTConfig c = tiny_config();
  VisionTransformer a = make_model(c, 1);
  auto state = state_of(*a);
  std::vector<std::pair<std::string, torch::Tensor>> edited;
  for (auto& [k, v] : state) {
    if (k == "norm.bias") continue;                                              // missing
    if (k == "head.weight") v = torch::zeros({7, 32});                         // wrong shape
    edited.emplace_back(k, v);
  }
  edited.emplace_back("blocks.9.attn.qkv.weight", torch::zeros({3}));          // unexpected
  std::string path = temp_path("mismatch.safetensors");
  save_tensors(path, edited);
  VisionTransformer b = make_model(c, 2);
  torch::Tensor before = b->named_parameters()["blocks.0.attn.qkv.weight"].clone();
  std::string msg = load_error(*b, path);
  EXPECT_NE(msg.find(path + " does not fit the model: 3 problems"), std::string::npos) << msg;
  EXPECT_NE(msg.find("missing key norm.bias (expected shape [32])"), std::string::npos) << msg;
  EXPECT_NE(msg.find("shape mismatch for head.weight: expected [5, 32], found [7, 32]"), std::string::npos) << msg;
  EXPECT_NE(msg.find("unexpected key blocks.9.attn.qkv.weight (shape [3])"), std::string::npos) << msg;
  EXPECT_TRUE(torch::equal(before, b->named_parameters()["blocks.0.attn.qkv.weight"])) << "modified on error";
}

TEST(Checkpoint, ArchMismatchIsReported) {
  ViTConfig small = tiny_config();
  ViTConfig wide = tiny_config();
  wide.dim = 64;
  VisionTransformer a = make_model(wide, 1);
  std::string path = temp_path("wide.safetensors");
  save_tensors(path, state_of(*a));
  VisionTransformer b = make_model(small, 1);
  EXPECT_NE(load_error(*b, path).find("shape mismatch for pos_embed: expected [1, 17, 32], found [1, 17, 64]"),
            std::string::npos);
}

// A Hugging Face ViTForImageClassification state dict of the same weights.
std::vector<std::pair<std::string, torch::Tensor>> to_hf(const VisionTransformer& m) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  auto p = m->named_parameters();
  const int64_t D = m->config.dim;
  out.emplace_back("vit.embeddings.cls_token", p["cls_token"]);
  out.emplace_back("vit.embeddings.position_embeddings", p["pos_embed"]);
  out.emplace_back("vit.embeddings.patch_embeddings.projection.weight", p["patch_embed.proj.weight"]);
  out.emplace_back("vit.embeddings.patch_embeddings.projection.bias", p["patch_embed.proj.bias"]);
  for (int64_t i = 0; i < m->config.depth; ++i) {
    std::string t = "blocks." + std::to_string(i) + ".", h = "vit.encoder.layer." + std::to_string(i) + ".";
    for (const char* wb : {"weight", "bias"}) {
      std::string s = wb;
      out.emplace_back(h + "layernorm_before." + s, p[t + "norm1." + s]);
      const char* parts[] = {"query", "key", "value"};
      for (int64_t k = 0; k < 3; ++k)
        out.emplace_back(h + "attention.attention." + parts[k] + "." + s, p[t + "attn.qkv." + s].narrow(0, k * D, D));
      out.emplace_back(h + "attention.output.dense." + s, p[t + "attn.proj." + s]);
      out.emplace_back(h + "layernorm_after." + s, p[t + "norm2." + s]);
      out.emplace_back(h + "intermediate.dense." + s, p[t + "mlp.fc1." + s]);
      out.emplace_back(h + "output.dense." + s, p[t + "mlp.fc2." + s]);
    }
  }
  out.emplace_back("vit.layernorm.weight", p["norm.weight"]);
  out.emplace_back("vit.layernorm.bias", p["norm.bias"]);
  out.emplace_back("vit.pooler.dense.weight", torch::zeros({D, D}));  // not part of timm's ViT: ignored
  out.emplace_back("classifier.weight", p["head.weight"]);
  out.emplace_back("classifier.bias", p["head.bias"]);
  return out;
}

TEST(Checkpoint, HuggingFaceNamesMapToTimm) {
  const ViTConfig c = tiny_config();
  VisionTransformer a = make_model(c, 1), b = make_model(c, 2);
  std::string path = temp_path("hf.safetensors");
  save_tensors(path, to_hf(a));
  CheckpointReader reader(path);
  EXPECT_TRUE(reader.mapped_from_hf());
  EXPECT_EQ(reader.shape("blocks.1.attn.qkv.weight"), (std::vector<int64_t>{96, 32}));
  load_state(*b, reader);
  torch::Tensor x = torch::randn({2, 1, 28, 28});
  EXPECT_TRUE(torch::equal(logits_of(a, x), logits_of(b, x)));
}

TEST(Checkpoint, IncompleteHuggingFaceQkvIsReported) {
  const ViTConfig c = tiny_config();
  VisionTransformer a = make_model(c, 1);
  auto hf = to_hf(a);
  hf.erase(std::remove_if(hf.begin(), hf.end(),
                          [](const auto& kv) { return kv.first == "vit.encoder.layer.0.attention.attention.key.weight"; }),
           hf.end());
  std::string path = temp_path("hf_partial.safetensors");
  save_tensors(path, hf);
  VisionTransformer b = make_model(c, 2);
  std::string msg = load_error(*b, path);
  EXPECT_NE(msg.find("missing key blocks.0.attn.qkv.weight"), std::string::npos) << msg;
  EXPECT_NE(msg.find("unexpected key vit.encoder.layer.0.attention.attention.query.weight"), std::string::npos) << msg;
}

TEST(Checkpoint, ShardedIndexLoads) {
  const ViTConfig c = tiny_config();
  VisionTransformer a = make_model(c, 1), b = make_model(c, 2);
  std::string dir = temp_path("sharded");
  ASSERT_EQ(std::system(("mkdir -p " + dir).c_str()), 0);
  auto state = state_of(*a);
  std::vector<std::pair<std::string, torch::Tensor>> first(state.begin(), state.begin() + 10),
      second(state.begin() + 10, state.end());
  save_tensors(dir + "/model-00001-of-00002.safetensors", first);
  save_tensors(dir + "/model-00002-of-00002.safetensors", second);
  json::Json map = json::Json::object();
  for (auto& [k, _] : first) map[k] = "model-00001-of-00002.safetensors";
  for (auto& [k, _] : second) map[k] = "model-00002-of-00002.safetensors";
  json::Json index = {{"metadata", json::Json::object()}, {"weight_map", map}};
  std::ofstream(dir + "/model.safetensors.index.json") << index.dump(2);
  load_state(*b, CheckpointReader(dir));  // a directory finds its index
  torch::Tensor x = torch::randn({2, 1, 28, 28});
  EXPECT_TRUE(torch::equal(logits_of(a, x), logits_of(b, x)));

  // An index that points a tensor at the wrong shard is an error naming it.
  map["norm.bias"] = "model-00001-of-00002.safetensors";
  index["weight_map"] = map;
  std::ofstream(dir + "/model.safetensors.index.json") << index.dump(2);
  try {
    CheckpointReader r(dir);
    FAIL();
  } catch (const CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("puts 'norm.bias' in model-00001-of-00002.safetensors"), std::string::npos)
        << e.what();
  }
}

TEST(Checkpoint, MalformedFileSurfacesTheFormatError) {
  std::string path = temp_path("garbage.safetensors");
  std::ofstream(path) << "not a safetensors file at all";
  try {
    CheckpointReader r(path);
    FAIL();
  } catch (const safetensors::FormatError& e) {
    EXPECT_NE(std::string(e.what()).find(path + ": header length"), std::string::npos) << e.what();
  }
}

namespace {

int64_t resident_bytes() {  // this process's resident set, from /proc/self/statm (pages)
  std::ifstream statm("/proc/self/statm");
  int64_t size = 0, resident = 0;
  statm >> size >> resident;
  return resident * ::sysconf(_SC_PAGESIZE);
}

}  // namespace

// Loading copies each tensor out of the file mapping and then drops the mapped pages, so a
// checkpoint's bytes do not stay in the process's resident set beside the loaded copy.
TEST(Checkpoint, ReadTensorsLeaveNoMappedPagesResident) {
  const std::string path = temp_path("resident.safetensors");
  const int64_t n = 16 << 20;  // 64 MB of fp32 in two tensors
  save_tensors(path, {{"a", torch::rand({n / 2})}, {"b", torch::rand({n / 2})}});
  {
    CheckpointReader reader(path);
    const int64_t before = resident_bytes();
    torch::Tensor a = reader.read("a", torch::kFloat32);
    torch::Tensor b = reader.read("b", torch::kFloat32, 0, {0, 1, 2});  // a slice touches few pages
    const int64_t grown = resident_bytes() - before;
    // The copy of `a` (32 MB) is resident; its source pages in the mapping must not be.
    EXPECT_LT(grown, 40 << 20) << "resident set grew by " << grown << " bytes";
    EXPECT_GE(grown, 24 << 20) << "the copy itself should be resident";
    EXPECT_EQ(b.numel(), 3);
  }
  std::remove(path.c_str());
}

// The output.dir lock: a second holder is refused with the directory and the first holder's
// pid in the message (flock locks are per open file, so this holds inside one process too);
// once the first lets go, the lock is free again.
TEST(OutputDirLock, ASecondHolderIsRefusedNamingTheFirst) {
  char tmpl[] = "/tmp/shardtune_lock_XXXXXX";
  const std::string dir = ::mkdtemp(tmpl);
  {
    shardtune::OutputDirLock first(dir);
    try {
      shardtune::OutputDirLock second(dir);
      FAIL() << "a second lock on " << dir << " was granted";
    } catch (const std::runtime_error& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find("output.dir=" + dir + " is in use by another run (pid " + std::to_string(::getpid()) + " on "),
                std::string::npos)
          << what;
    }
  }
  EXPECT_NO_THROW(shardtune::OutputDirLock again(dir));
  std::remove((dir + "/.lock").c_str());
  ::rmdir(dir.c_str());
}
