// ops/: the Tuner's choice, cache and failure handling, and that train.frozen_gemm=auto picks
// among exact kernels only (its results equal the forced paths').
#include <gtest/gtest.h>
#include <spdlog/sinks/ringbuffer_sink.h>
#include <spdlog/spdlog.h>
#include <torch/torch.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <thread>

#include "models/vit.h"
#include "ops/onednn_matmul.h"
#include "ops/ops.h"
#include "ops/tuner.h"
#include "peft/method.h"
#include "tiny.h"

namespace shardtune {
namespace {

namespace fs = std::filesystem;
using ops::Tuner;

// A fresh directory for one test's cache, removed afterwards.
struct TempDir {
  TempDir() {
    path = (fs::temp_directory_path() / ("shardtune_ops_" + std::to_string(::getpid()) + "_" +
                                         std::to_string(counter++)))
               .string();
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
  std::string path;
  static inline int counter = 0;
};

// Collects what spdlog logs during a scope.
struct CapturedLog {
  CapturedLog() : sink(std::make_shared<spdlog::sinks::ringbuffer_sink_mt>(64)), saved(spdlog::default_logger()) {
    spdlog::set_default_logger(std::make_shared<spdlog::logger>("capture", sink));
  }
  ~CapturedLog() { spdlog::set_default_logger(saved); }
  std::string text() const {
    std::string all;
    for (const auto& line : sink->last_formatted()) all += line;
    return all;
  }
  std::shared_ptr<spdlog::sinks::ringbuffer_sink_mt> sink;
  std::shared_ptr<spdlog::logger> saved;
};

void sleep_ms(int ms) { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }

// Two candidates, one 10x slower; counts the full (not probe) calls of each.
struct Counted {
  int fast_calls = 0, slow_calls = 0, slow_probes = 0;  // probes: two per candidate (warm, timed)
  std::vector<Tuner::Candidate> candidates(int slow_ms = 40) {
    return {{"slow",
             [this, slow_ms](bool probe) {
               probe ? ++slow_probes : ++slow_calls;
               sleep_ms(probe ? 2 : slow_ms);
             }},
            {"fast", [this](bool probe) {
               if (!probe) ++fast_calls;
               sleep_ms(probe ? 1 : 2);
             }}};
  }
};

TEST(Tuner, PicksTheFastestAndRecordsEachCandidatesTime) {
  Tuner t("", 3);
  Counted c;
  EXPECT_EQ(t.choose("k", c.candidates()), "fast");
  EXPECT_EQ(c.fast_calls, 4);  // warm-up + 3 timed
  EXPECT_EQ(c.slow_calls, 4);
  const auto choices = t.choices();
  ASSERT_EQ(choices.count("k"), 1u);
  EXPECT_EQ(choices.at("k").pick, "fast");
  EXPECT_GT(choices.at("k").us.at("slow"), choices.at("k").us.at("fast"));
  EXPECT_FALSE(choices.at("k").cached);
  // A second ask is remembered: nothing runs.
  EXPECT_EQ(t.choose("k", c.candidates()), "fast");
  EXPECT_EQ(c.fast_calls, 4);
  EXPECT_GT(t.seconds_measuring(), 0.0);
}

TEST(Tuner, AProbeFarBehindTheBestIsNotTimedFurther) {
  Tuner t("", 3);
  std::vector<Tuner::Candidate> cands;
  int slow_full = 0;
  cands.push_back({"slow", [&](bool probe) {
                     if (!probe) ++slow_full;
                     sleep_ms(probe ? 100 : 300);
                   }});
  cands.push_back({"fast", [](bool) { sleep_ms(1); }});
  EXPECT_EQ(t.choose("k", cands), "fast");
  EXPECT_EQ(slow_full, 0);
  EXPECT_EQ(t.choices().at("k").us.count("slow (probe)"), 1u);
}

TEST(Tuner, ACandidateThatThrowsIsLeftOutAndAllThrowingPropagates) {
  Tuner t("", 1);
  std::vector<Tuner::Candidate> cands = {{"broken", [](bool) { throw std::runtime_error("no such kernel"); }},
                                         {"works", [](bool) {}}};
  EXPECT_EQ(t.choose("k", cands), "works");
  std::vector<Tuner::Candidate> none = {{"broken", [](bool) { throw std::runtime_error("no such kernel"); }}};
  EXPECT_THROW(t.choose("k2", none), std::runtime_error);
}

TEST(Tuner, ASecondProcessReadsTheCacheAndMeasuresNothing) {
  TempDir dir;
  const std::string file = Tuner::cache_file_in(dir.path);
  {
    Tuner first(file, 2);
    Counted c;
    EXPECT_EQ(first.choose("gemm fp32 fwd 8x8x8 t1", c.candidates()), "fast");
  }
  ASSERT_TRUE(fs::exists(file));
  Tuner second(file, 2);
  Counted c;
  EXPECT_EQ(second.choose("gemm fp32 fwd 8x8x8 t1", c.candidates()), "fast");
  EXPECT_EQ(c.fast_calls + c.slow_calls + c.slow_probes, 0);
  EXPECT_TRUE(second.choices().at("gemm fp32 fwd 8x8x8 t1").cached);
  EXPECT_EQ(second.seconds_measuring(), 0.0);
}

// The first measurement of a key wins: a process that measured differently adopts the file's
// pick for its next run, so ranks sharing a cache agree.
TEST(Tuner, TheFirstMeasurementOfAKeyWinsInTheFile) {
  TempDir dir;
  const std::string file = Tuner::cache_file_in(dir.path);
  Tuner a(file, 1), b(file, 1);
  std::vector<Tuner::Candidate> x_first = {{"x", [](bool) {}}, {"y", [](bool) { sleep_ms(20); }}};
  EXPECT_EQ(a.choose("k", x_first), "x");
  std::vector<Tuner::Candidate> y_first = {{"x", [](bool) { sleep_ms(20); }}, {"y", [](bool) {}}};
  // b has not seen "k" yet: it reads the file under the lock and adopts a's pick unmeasured.
  EXPECT_EQ(b.choose("k", y_first), "x");
  EXPECT_TRUE(b.choices().at("k").cached);
}

// A choice measured among other candidates (an earlier build's, one without oneDNN's headers)
// is not reused: the key is measured again among this process's candidates, and that result
// is what the next process with the same candidates reads.
TEST(Tuner, AChoiceAmongOtherCandidatesIsMeasuredAgain) {
  TempDir dir;
  const std::string file = Tuner::cache_file_in(dir.path);
  int z_calls = 0;
  std::vector<Tuner::Candidate> two = {{"x", [](bool) { sleep_ms(5); }}, {"y", [](bool) { sleep_ms(20); }}};
  std::vector<Tuner::Candidate> three = two;
  three.push_back({"z", [&](bool) { ++z_calls; }});
  EXPECT_EQ(Tuner(file, 1).choose("k", two), "x");
  Tuner second(file, 1);
  EXPECT_EQ(second.choose("k", three), "z");
  EXPECT_FALSE(second.choices().at("k").cached);
  EXPECT_GT(z_calls, 0);
  z_calls = 0;
  Tuner third(file, 1);
  EXPECT_EQ(third.choose("k", three), "z");
  EXPECT_TRUE(third.choices().at("k").cached);
  EXPECT_EQ(z_calls, 0);
  EXPECT_EQ(Tuner(file, 1).choose("k", two), "x");  // the first set's entry is still there
}

TEST(Tuner, ACorruptCacheIsIgnoredWithAWarningAndRewritten) {
  TempDir dir;
  const std::string file = Tuner::cache_file_in(dir.path);
  std::ofstream(file) << "{\"format_version\": 1, \"host\": tru";  // torn
  CapturedLog log;
  Tuner t(file, 1);
  Counted c;
  EXPECT_EQ(t.choose("k", c.candidates()), "fast");
  EXPECT_GT(c.fast_calls, 0);  // measured
  EXPECT_NE(log.text().find("ignoring the kernel-choice cache " + file), std::string::npos) << log.text();
  Tuner again(file, 1);  // rewritten whole
  Counted d;
  EXPECT_EQ(again.choose("k", d.candidates()), "fast");
  EXPECT_EQ(d.fast_calls, 0);
}

TEST(Tuner, ACacheOfAnotherHostOrFormatIsIgnored) {
  TempDir dir;
  const std::string file = Tuner::cache_file_in(dir.path);
  for (const std::string& body :
       {std::string(R"({"format_version": 2, "host": "some other CPU", "choices": {"k": {"pick": "slow", "us": {}}}})"),
        std::string(R"({"format_version": 99, "host": "x", "choices": {}})")}) {
    std::ofstream(file) << body;
    CapturedLog log;
    Tuner t(file, 1);
    Counted c;
    EXPECT_EQ(t.choose("k", c.candidates()), "fast") << body;
    EXPECT_NE(log.text().find("ignoring the kernel-choice cache"), std::string::npos) << log.text();
  }
}

TEST(Tuner, CacheDirectoryRules) {
  EXPECT_EQ(Tuner::resolve_cache_dir("-"), "");
  EXPECT_EQ(Tuner::resolve_cache_dir("/x/y"), "/x/y");
  const char* old = std::getenv("XDG_CACHE_HOME");
  const std::string saved = old ? old : "";
  ::setenv("XDG_CACHE_HOME", "/tmp/xdg", 1);
  EXPECT_EQ(Tuner::resolve_cache_dir(""), "/tmp/xdg/shardtune");
  if (old) ::setenv("XDG_CACHE_HOME", saved.c_str(), 1); else ::unsetenv("XDG_CACHE_HOME");
  EXPECT_EQ(Tuner::cache_file_in(""), "");
  EXPECT_NE(Tuner::cache_file_in("/d").find("/d/kernels-"), std::string::npos);
}

std::shared_ptr<const ops::Ops> auto_ops(const std::string& cache_dir, int64_t min_macs = 0) {
  ops::CpuOptions o;
  o.frozen_gemm = FrozenGemm::Auto;
  o.min_macs = min_macs;
  o.cache_dir = cache_dir;
  o.repetitions = 1;
  return ops::make_cpu_ops(o);
}

// auto's frozen GEMMs, forward and input gradient, equal the forced paths' within their own
// accuracy, at fp32 and bf16, and every choice is reported.
TEST(AutoOps, FrozenLinearEqualsTheForcedPathsAndReportsItsChoices) {
  TempDir dir;
  auto ops = auto_ops(dir.path);
  torch::manual_seed(3);
  for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
    const torch::Tensor w = (torch::randn({96, 160}) * 0.1).to(dtype);
    const torch::Tensor b = torch::randn({96}).to(dtype);
    const torch::Tensor x0 = torch::randn({4, 70, 160}).to(dtype);
    auto run = [&](const std::shared_ptr<const ops::Ops>& o, torch::ScalarType t) {
      torch::Tensor x = x0.to(t).requires_grad_(true);
      torch::Tensor y = o->linear(x, w.to(t), b.to(t));
      (y * torch::linspace(-1, 1, 96).to(t)).sum().backward();
      return std::make_pair(y.detach().to(torch::kDouble), x.grad().to(torch::kDouble));
    };
    const auto exact = run(cpu_ops(FrozenGemm::Blas), torch::kDouble);
    const auto got = run(ops, dtype);
    const double tol = dtype == torch::kFloat ? 1e-5 : 2e-2;
    EXPECT_LT(rel_err(got.first, exact.first), tol);
    EXPECT_LT(rel_err(got.second, exact.second), tol);
  }
  const auto report = ops->report();
  EXPECT_EQ(report.at("frozen_gemm"), "auto");
  int fwd = 0, bwd = 0;
  for (const auto& [key, c] : report.at("choices").items()) {
    fwd += key.find(" fwd 280x160x96 ") != std::string::npos;
    bwd += key.find(" bwd 280x96x160 ") != std::string::npos;
    EXPECT_FALSE(c.at("pick").get<std::string>().empty()) << key;
  }
  EXPECT_EQ(fwd, 2);  // fp32 and bf16
  EXPECT_EQ(bwd, 2);
}

// One LoRA step of a small ViT (every GEMM through `o`): its logits and every trainable gradient.
std::vector<torch::Tensor> tiny_lora_step(const std::shared_ptr<const ops::Ops>& o) {
  ViTConfig c = tiny_config();
  c.image_size = 56;
  c.dim = 64;
  c.mlp_dim = 256;
  torch::manual_seed(5);
  VisionTransformer model(c, StagePart::whole(c), true, o);
  randomize_for_test(*model);
  PeftConfig p;
  p.method = "lora";
  PeftState state = apply_peft(*model, p);
  {
    torch::NoGradGuard g;
    for (auto& [name, t] : state.trainable) t.normal_(0, 0.3);
  }
  torch::manual_seed(6);
  torch::Tensor logits = model->forward(torch::randn({4, 1, 56, 56}));
  logits.pow(2).sum().backward();
  std::vector<torch::Tensor> out{logits.detach()};
  for (auto& [name, t] : state.trainable) out.push_back(t.grad().clone());
  return out;
}

// A ViT step (LoRA, every GEMM tuned) under auto against the blas path, fp32: logits and
// every trainable gradient within the existing tolerance.
TEST(AutoOps, ViTLoraStepEqualsTheBlasPath) {
  TempDir dir;
  const auto want = tiny_lora_step(cpu_ops(FrozenGemm::Blas, 0));
  const auto got = tiny_lora_step(auto_ops(dir.path));
  ASSERT_EQ(want.size(), got.size());
  for (size_t i = 0; i < want.size(); ++i) EXPECT_LT(rel_err(got[i], want[i]), 1e-5) << "output " << i;
}

// The bf16 attention products and trainable GEMMs under auto: LibTorch's bf16 op or its fp32
// twin, whichever is faster; either way the values match the fp32 computation to bf16 accuracy.
TEST(AutoOps, Bf16MatmulAndTrainableLinearMatchFp32) {
  TempDir dir;
  auto ops = auto_ops(dir.path);
  torch::manual_seed(2);
  torch::Tensor a = torch::randn({2, 3, 40, 16}), b = torch::randn({2, 3, 16, 40});
  torch::Tensor got = ops->matmul(a.to(torch::kBFloat16), b.to(torch::kBFloat16));
  EXPECT_EQ(got.scalar_type(), torch::kBFloat16);
  EXPECT_LT(rel_err(got.to(torch::kFloat), torch::matmul(a, b)), 1e-2);
  torch::Tensor w = torch::randn({64, 128}).requires_grad_(true);  // trainable, fp32 master
  torch::Tensor x = torch::randn({300, 128});
  torch::Tensor y = ops->linear(x.to(torch::kBFloat16), w.to(torch::kBFloat16), torch::Tensor());
  EXPECT_EQ(y.scalar_type(), torch::kBFloat16);
  y.to(torch::kFloat).sum().backward();
  ASSERT_TRUE(w.grad().defined());
  torch::Tensor w2 = w.detach().clone().requires_grad_(true);
  torch::linear(x, w2).sum().backward();
  EXPECT_LT(rel_err(w.grad(), w2.grad()), 1e-2);
  bool saw_matmul = false, saw_linear = false;
  const nlohmann::json report = ops->report();  // (a temporary's items() would dangle)
  SCOPED_TRACE(report.dump());
  for (const auto& [key, c] : report.at("choices").items()) {
    saw_matmul = saw_matmul || key.rfind("matmul bf16", 0) == 0;
    saw_linear = saw_linear || key.rfind("linear bf16 trainable", 0) == 0;
  }
  EXPECT_TRUE(saw_matmul);
  EXPECT_TRUE(saw_linear);
}

// Attention's fp32 products as per-entry GEMMs: the values torch::matmul gives (the same GEMM
// per entry), and gradients of both operands, also through transposed views (k^T), against
// float64 autograd.
TEST(AutoOps, Fp32BatchedMatmulEqualsTorchInValueAndGradients) {
  torch::manual_seed(3);
  torch::Tensor q = torch::randn({2, 3, 37, 16}, torch::kDouble), k = torch::randn({2, 3, 37, 16}, torch::kDouble);
  torch::Tensor w = torch::randn({2, 3, 37, 37}, torch::kDouble);
  auto grads = [&](bool ours, torch::ScalarType t) {
    torch::Tensor a = q.to(t).clone().requires_grad_(true), b = k.to(t).clone().requires_grad_(true);
    torch::Tensor bt = b.transpose(-2, -1);  // a strided view, as attention passes k^T
    torch::Tensor s = ours ? ops::batched_matmul(a, bt) : torch::matmul(a, bt);
    torch::Tensor o = ours ? ops::batched_matmul(s, b) : torch::matmul(s, b);  // p v's shape
    (o.sum(-1, true) * w.to(t)).sum().backward();
    return std::vector<torch::Tensor>{s.detach(), o.detach(), a.grad(), b.grad()};
  };
  const auto ref = grads(false, torch::kDouble), mine64 = grads(true, torch::kDouble);
  const auto torch32 = grads(false, torch::kFloat), mine32 = grads(true, torch::kFloat);
  for (size_t i = 0; i < ref.size(); ++i) {
    EXPECT_LT(rel_err(mine64[i], ref[i]), 1e-12) << i;
    EXPECT_LT(rel_err(mine32[i].to(torch::kDouble), ref[i]), 1e-5) << i;
  }
  EXPECT_TRUE(torch::equal(mine32[0], torch32[0]));  // forward: the same GEMM per entry
  EXPECT_TRUE(torch::equal(mine32[1], torch32[1]));
  TempDir dir;  // under auto the choice is measured and reported
  auto ops = auto_ops(dir.path);
  torch::Tensor a = torch::randn({2, 3, 40, 16}), b = torch::randn({2, 3, 16, 40});
  EXPECT_TRUE(torch::equal(ops->matmul(a, b), torch::matmul(a, b)));
  const nlohmann::json report = ops->report();
  bool saw = false;
  for (const auto& [key, c] : report.at("choices").items()) saw = saw || key.rfind("matmul fp32", 0) == 0;
  EXPECT_TRUE(saw) << report.dump();
}

// oneDNN's matmul on LibTorch's memory: plain and transposed-view operands (W^T, k^T, A^T),
// batched, fp32 and bf16, against float64; the gradients of its batched autograd function;
// refusals that name the shapes.
TEST(OnednnMatmul, EqualsFloat64OnPlainAndTransposedViews) {
  if (!ops::onednn_matmul_available()) GTEST_SKIP() << "built without libdnnl-dev";
  torch::manual_seed(4);
  auto check = [](const torch::Tensor& a, const torch::Tensor& b, const std::string& what) {
    const torch::Tensor want = torch::matmul(a.to(torch::kDouble), b.to(torch::kDouble));
    for (auto dt : {torch::kFloat, torch::kBFloat16}) {
      // bf16 operands: the reference is their exact product, so only the output rounding counts
      const torch::Tensor a_ = a.to(dt), b_ = b.to(dt);
      const torch::Tensor ref = torch::matmul(a_.to(torch::kDouble), b_.to(torch::kDouble));
      torch::Tensor got = ops::onednn_matmul(a_, b_);
      EXPECT_EQ(got.scalar_type(), dt) << what;
      EXPECT_TRUE(got.is_contiguous()) << what;
      EXPECT_LT(rel_err(got.to(torch::kDouble), ref), dt == torch::kFloat ? 1e-6 : 8e-3) << what;
    }
    EXPECT_LT(rel_err(ops::onednn_matmul(a, b).to(torch::kDouble), want), 1e-6) << what;
  };
  const torch::Tensor x = torch::randn({70, 96}), w = torch::randn({40, 96});
  check(x, w.t(), "x W^T");
  check(x.t().contiguous().t(), torch::randn({96, 33}), "a column-major x");
  check(x.narrow(0, 5, 31), w.t(), "a row slice");
  const torch::Tensor q = torch::randn({2, 3, 37, 16}), k = torch::randn({2, 3, 37, 16});
  check(q, k.transpose(-2, -1), "q k^T");
  check(torch::randn({2, 3, 37, 37}), k, "p v");
  check(q.transpose(-2, -1), torch::randn({2, 3, 37, 37}), "A^T dC");
  check(torch::randn({2, 5, 0}), torch::randn({2, 0, 4}), "K = 0");
  auto refused = [](const torch::Tensor& a, const torch::Tensor& b, const std::string& words) {
    try {
      ops::onednn_matmul(a, b);
      ADD_FAILURE() << "accepted: " << words;
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(words), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("[2, 4, 5]"), std::string::npos) << e.what();  // names a's shape
    }
  };
  refused(torch::randn({2, 4, 5}), torch::randn({2, 5, 3}, torch::kDouble), "fp32 or bf16");
  refused(torch::randn({2, 4, 5}), torch::randn({3, 5, 3}), "the same batch dims");
  refused(torch::randn({2, 4, 5}), torch::randn({2, 6, 3}), "do not multiply");
}

TEST(OnednnMatmul, BatchedGradientsEqualFloat64Autograd) {
  if (!ops::onednn_matmul_available()) GTEST_SKIP() << "built without libdnnl-dev";
  torch::manual_seed(5);
  torch::Tensor q = torch::randn({2, 3, 37, 16}, torch::kDouble), k = torch::randn({2, 3, 37, 16}, torch::kDouble);
  torch::Tensor w = torch::randn({2, 3, 37, 37}, torch::kDouble);
  auto grads = [&](bool ours, torch::ScalarType t) {
    torch::Tensor a = q.to(t).clone().requires_grad_(true), b = k.to(t).clone().requires_grad_(true);
    torch::Tensor bt = b.transpose(-2, -1);
    torch::Tensor s = ours ? ops::batched_matmul(a, bt, "onednn_matmul") : torch::matmul(a, bt);
    torch::Tensor o = ours ? ops::batched_matmul(s, b, "onednn_matmul") : torch::matmul(s, b);
    (o.sum(-1, true) * w.to(t)).sum().backward();
    return std::vector<torch::Tensor>{s.detach(), o.detach(), a.grad(), b.grad()};
  };
  const auto ref = grads(false, torch::kDouble), mine = grads(true, torch::kFloat);
  for (size_t i = 0; i < ref.size(); ++i) EXPECT_LT(rel_err(mine[i].to(torch::kDouble), ref[i]), 1e-5) << i;
  EXPECT_THROW(ops::batched_matmul(q, k.transpose(-2, -1), "mkl"), std::invalid_argument);
}

// train.frozen_gemm=onednn_matmul forced: the ViT LoRA step (frozen GEMMs and attention through
// oneDNN's matmul) equals the blas path's within fp32 accuracy, and measures nothing.
TEST(OnednnMatmul, ForcedViTLoraStepEqualsTheBlasPath) {
  if (!ops::onednn_matmul_available()) GTEST_SKIP() << "built without libdnnl-dev";
  const auto want = tiny_lora_step(cpu_ops(FrozenGemm::Blas, 0));
  const auto forced = cpu_ops(FrozenGemm::OneDnnMatmul, 0);
  const auto got = tiny_lora_step(forced);
  ASSERT_EQ(want.size(), got.size());
  for (size_t i = 0; i < want.size(); ++i) EXPECT_LT(rel_err(got[i], want[i]), 1e-5) << "output " << i;
  EXPECT_EQ(forced->report().at("frozen_gemm"), "onednn_matmul");
  EXPECT_FALSE(forced->report().contains("choices"));
}

TEST(AutoOps, ForcedPathsMeasureNothing) {
  auto report = cpu_ops(FrozenGemm::OneDnn)->report();
  EXPECT_EQ(report.at("frozen_gemm"), "onednn");
  EXPECT_FALSE(report.contains("choices"));
  EXPECT_EQ(ops::torch_ops()->name(), "torch");
}

}  // namespace
}  // namespace shardtune
