// The backbone: parameter names and counts are timm's, and the forward pass equals an
// independent scalar implementation of timm's ViT (written below with plain loops in
// double precision) for every option: token/avg pooling, qkv bias, layer scale, QK-norm.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <map>
#include <set>

#include "models/vit.h"
#include "tests/tiny.h"

using namespace shardtune;

// --- parameter counts ----------------------------------------------------------------

TEST(ViTConfig, PresetParameterCountsMatchTimm) {
  // timm.create_model(name).num_parameters() with 1000 classes.
  const std::map<std::string, int64_t> timm = {
      {"vit_tiny_patch16_224", 5717416},
      {"vit_small_patch16_224", 22050664},
      {"vit_base_patch16_224", 86567656},
      {"vit_large_patch16_224", 304326632},
      {"vit_huge_patch14_224", 632045800},
  };
  for (const auto& [name, count] : timm) EXPECT_EQ(vit_preset(name).param_count(), count) << name;
  // REFERENCE.md's rounded sizes for the presets timm does not ship at 224 px with a head.
  const std::map<std::string, double> approx = {{"vit_giant_patch14_224", 1.0e9},
                                                {"vit_gigantic_patch14_224", 1.8e9},
                                                {"vit_e_patch14_224", 3.9e9},
                                                {"vit_22b", 21.7e9}};
  for (const auto& [name, count] : approx)
    EXPECT_NEAR(vit_preset(name).param_count() / count, 1.0, 0.04) << name << " " << vit_preset(name).param_count();
}

TEST(ViTConfig, BuiltModelHasTheClosedFormCount) {
  for (const char* arch : {"vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224"}) {
    VisionTransformer m(vit_preset(arch));
    int64_t n = 0;
    for (const auto& p : m->parameters()) n += p.numel();
    EXPECT_EQ(n, vit_preset(arch).param_count()) << arch;
  }
  for (const ViTConfig& c : tiny_variants()) {
    VisionTransformer m(c);
    int64_t n = 0;
    for (const auto& p : m->parameters()) n += p.numel();
    EXPECT_EQ(n, c.param_count()) << describe(c);
  }
}

TEST(ViTConfig, ParameterShapesAreTheBuiltModels) {
  for (const ViTConfig& c : tiny_variants()) {
    VisionTransformer m(c);
    std::map<std::string, std::vector<int64_t>> built, declared;
    for (const auto& p : m->named_parameters()) built[p.key()] = p.value().sizes().vec();
    for (const auto& [name, shape] : c.parameter_shapes()) declared[name] = shape;
    EXPECT_EQ(built, declared) << describe(c);
  }
}

TEST(ViTConfig, UnknownPresetListsTheKnownOnes) {
  try {
    vit_preset("vit_enormous");
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("model.arch=vit_enormous"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("vit_giant_patch14_224"), std::string::npos);
  }
  EXPECT_EQ(vit_preset("vit_22b").dim, 6144);
  EXPECT_FALSE(vit_preset("vit_22b").qkv_bias);
  EXPECT_TRUE(vit_preset("vit_22b").qk_norm);
}

TEST(ViTConfig, ValidationNamesTheKeys) {
  ViTConfig c = tiny_config();
  c.heads = 5;
  EXPECT_THROW(
      {
        try {
          c.validate();
        } catch (const std::invalid_argument& e) {
          EXPECT_STREQ(e.what(), "model.heads=5 does not divide model.dim=32");
          throw;
        }
      },
      std::invalid_argument);
  c = tiny_config();
  c.patch_size = 5;
  EXPECT_THROW(c.validate(), std::invalid_argument);
  c = tiny_config();
  c.global_pool = "max";
  EXPECT_THROW(c.validate(), std::invalid_argument);
}

TEST(ViTConfig, ForwardFlopsOfViTBase) {
  // REFERENCE.md: ViT-B/16 forward at 224 px is 35.1 GFLOPs.
  EXPECT_NEAR(vit_preset("vit_base_patch16_224").forward_flops_per_image() / 1e9, 35.1, 0.2);
}

// --- names ---------------------------------------------------------------------------

TEST(ViT, ParameterNamesAreTimms) {
  ViTConfig c = tiny_config();
  c.layer_scale = 1e-5;
  c.qk_norm = true;
  VisionTransformer m(c);
  std::set<std::string> names;
  for (const auto& p : m->named_parameters()) names.insert(p.key());
  for (const char* want :
       {"patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed", "blocks.0.norm1.weight",
        "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.0.attn.q_norm.weight", "blocks.0.attn.k_norm.bias",
        "blocks.0.attn.proj.weight", "blocks.1.norm2.bias", "blocks.1.mlp.fc1.weight", "blocks.1.mlp.fc2.bias",
        "blocks.1.ls1.gamma", "blocks.1.ls2.gamma", "norm.weight", "norm.bias", "head.weight", "head.bias"})
    EXPECT_TRUE(names.count(want)) << want;
  c.global_pool = "avg";
  c.qkv_bias = false;
  VisionTransformer avg(c);
  names.clear();
  for (const auto& p : avg->named_parameters()) names.insert(p.key());
  EXPECT_TRUE(names.count("fc_norm.weight"));
  EXPECT_FALSE(names.count("norm.weight"));
  EXPECT_FALSE(names.count("blocks.0.attn.qkv.bias"));
}

TEST(ViT, InitIsSeededAndTimmLike) {
  torch::manual_seed(7);
  VisionTransformer a(tiny_config());
  torch::manual_seed(7);
  VisionTransformer b(tiny_config());
  auto pa = a->named_parameters(), pb = b->named_parameters();
  for (const auto& p : pa) EXPECT_TRUE(torch::equal(p.value(), pb[p.key()])) << p.key();
  torch::Tensor w = pa["blocks.0.mlp.fc1.weight"];
  EXPECT_NEAR(w.std().item<double>(), 0.02 * 0.88, 0.004);  // trunc_normal(0.02) at +-2 std: std 0.88 * 0.02
  EXPECT_LE(w.abs().max().item<double>(), 0.04 + 1e-7);
  EXPECT_EQ(pa["blocks.0.mlp.fc1.bias"].abs().sum().item<double>(), 0.0);
  EXPECT_TRUE(torch::equal(pa["norm.weight"], torch::ones({32})));
  EXPECT_LT(pa["cls_token"].abs().max().item<double>(), 1e-5);
}

// --- forward against the scalar reference ------------------------------------------------

namespace {

using Vec = std::vector<double>;
using Mat = std::vector<Vec>;  // [rows][cols]

struct Weights {
  std::map<std::string, torch::Tensor> t;
  double at(const std::string& name, std::initializer_list<int64_t> idx) const {
    torch::Tensor x = t.at(name);
    int64_t off = 0, i = 0;
    for (int64_t v : idx) off = off * x.size(i++) + v;
    return x.data_ptr<double>()[off];
  }
  bool has(const std::string& name) const { return t.count(name) > 0; }
};

Mat linear(const Weights& w, const std::string& name, const Mat& x) {
  const torch::Tensor& W = w.t.at(name + ".weight");
  const int64_t out = W.size(0), in = W.size(1);
  Mat y(x.size(), Vec(static_cast<size_t>(out), 0.0));
  for (size_t n = 0; n < x.size(); ++n)
    for (int64_t o = 0; o < out; ++o) {
      double s = w.has(name + ".bias") ? w.at(name + ".bias", {o}) : 0.0;
      for (int64_t i = 0; i < in; ++i) s += w.at(name + ".weight", {o, i}) * x[n][static_cast<size_t>(i)];
      y[n][static_cast<size_t>(o)] = s;
    }
  return y;
}

Vec layer_norm(const Weights& w, const std::string& name, const Vec& x) {
  double mean = 0, var = 0;
  for (double v : x) mean += v;
  mean /= static_cast<double>(x.size());
  for (double v : x) var += (v - mean) * (v - mean);
  var /= static_cast<double>(x.size());
  Vec y(x.size());
  for (size_t i = 0; i < x.size(); ++i)
    y[i] = (x[i] - mean) / std::sqrt(var + 1e-6) * w.at(name + ".weight", {static_cast<int64_t>(i)}) +
           w.at(name + ".bias", {static_cast<int64_t>(i)});
  return y;
}

Mat layer_norm_rows(const Weights& w, const std::string& name, const Mat& x) {
  Mat y;
  for (const auto& row : x) y.push_back(layer_norm(w, name, row));
  return y;
}

// timm's ViT forward for one image [C, H, W], everything in double.
Vec reference_forward(const ViTConfig& c, const Weights& w, const torch::Tensor& image) {
  const int64_t D = c.dim, P = c.patch_size, g = c.grid(), H = c.heads, hd = c.head_dim();
  Mat x;  // tokens [N+1][D]
  Vec cls(static_cast<size_t>(D));
  for (int64_t d = 0; d < D; ++d) cls[static_cast<size_t>(d)] = w.at("cls_token", {0, 0, d});
  x.push_back(cls);
  auto img = image.accessor<double, 3>();
  for (int64_t py = 0; py < g; ++py)
    for (int64_t px = 0; px < g; ++px) {
      Vec tok(static_cast<size_t>(D));
      for (int64_t d = 0; d < D; ++d) {
        double s = w.at("patch_embed.proj.bias", {d});
        for (int64_t ch = 0; ch < c.in_chans; ++ch)
          for (int64_t ky = 0; ky < P; ++ky)
            for (int64_t kx = 0; kx < P; ++kx)
              s += w.at("patch_embed.proj.weight", {d, ch, ky, kx}) * img[ch][py * P + ky][px * P + kx];
        tok[static_cast<size_t>(d)] = s;
      }
      x.push_back(tok);
    }
  const size_t N = x.size();
  for (size_t n = 0; n < N; ++n)
    for (int64_t d = 0; d < D; ++d) x[n][static_cast<size_t>(d)] += w.at("pos_embed", {0, static_cast<int64_t>(n), d});

  for (int64_t b = 0; b < c.depth; ++b) {
    const std::string p = "blocks." + std::to_string(b) + ".";
    Mat qkv = linear(w, p + "attn.qkv", layer_norm_rows(w, p + "norm1", x));  // [N][3D]
    Mat attn_out(N, Vec(static_cast<size_t>(D), 0.0));
    for (int64_t h = 0; h < H; ++h) {
      Mat q(N, Vec(static_cast<size_t>(hd))), k = q, v = q;
      for (size_t n = 0; n < N; ++n)
        for (int64_t e = 0; e < hd; ++e) {
          q[n][static_cast<size_t>(e)] = qkv[n][static_cast<size_t>(h * hd + e)];
          k[n][static_cast<size_t>(e)] = qkv[n][static_cast<size_t>(D + h * hd + e)];
          v[n][static_cast<size_t>(e)] = qkv[n][static_cast<size_t>(2 * D + h * hd + e)];
        }
      if (c.qk_norm) {
        q = layer_norm_rows(w, p + "attn.q_norm", q);
        k = layer_norm_rows(w, p + "attn.k_norm", k);
      }
      for (size_t i = 0; i < N; ++i) {
        Vec s(N);
        double mx = -1e300, z = 0;
        for (size_t j = 0; j < N; ++j) {
          double dot = 0;
          for (int64_t e = 0; e < hd; ++e) dot += q[i][static_cast<size_t>(e)] * k[j][static_cast<size_t>(e)];
          s[j] = dot / std::sqrt(static_cast<double>(hd));
          mx = std::max(mx, s[j]);
        }
        for (size_t j = 0; j < N; ++j) z += (s[j] = std::exp(s[j] - mx));
        for (int64_t e = 0; e < hd; ++e) {
          double o = 0;
          for (size_t j = 0; j < N; ++j) o += s[j] / z * v[j][static_cast<size_t>(e)];
          attn_out[i][static_cast<size_t>(h * hd + e)] = o;
        }
      }
    }
    Mat a = linear(w, p + "attn.proj", attn_out);
    for (size_t n = 0; n < N; ++n)
      for (int64_t d = 0; d < D; ++d)
        x[n][static_cast<size_t>(d)] += a[n][static_cast<size_t>(d)] * (c.layer_scale > 0 ? w.at(p + "ls1.gamma", {d}) : 1.0);
    Mat hdn = linear(w, p + "mlp.fc1", layer_norm_rows(w, p + "norm2", x));
    for (auto& row : hdn)
      for (double& u : row) u = 0.5 * u * (1.0 + std::erf(u / std::sqrt(2.0)));  // exact GELU
    Mat m = linear(w, p + "mlp.fc2", hdn);
    for (size_t n = 0; n < N; ++n)
      for (int64_t d = 0; d < D; ++d)
        x[n][static_cast<size_t>(d)] += m[n][static_cast<size_t>(d)] * (c.layer_scale > 0 ? w.at(p + "ls2.gamma", {d}) : 1.0);
  }
  Vec pooled;
  if (c.global_pool == "avg") {
    pooled.assign(static_cast<size_t>(D), 0.0);
    for (size_t n = 1; n < N; ++n)
      for (size_t d = 0; d < static_cast<size_t>(D); ++d) pooled[d] += x[n][d] / static_cast<double>(N - 1);
    pooled = layer_norm(w, "fc_norm", pooled);
  } else {
    pooled = layer_norm(w, "norm", x[0]);
  }
  return linear(w, "head", Mat{pooled})[0];
}

}  // namespace

class ViTMatchesReference : public ::testing::TestWithParam<ViTConfig> {};

TEST_P(ViTMatchesReference, Logits) {
  const ViTConfig c = GetParam();
  torch::manual_seed(11);
  VisionTransformer model(c);
  randomize_for_test(*model);  // non-trivial norms, biases, cls token and layer scales
  model->to(torch::kFloat64);
  Weights w;
  for (const auto& p : model->named_parameters()) w.t[p.key()] = p.value().detach().contiguous();
  torch::Tensor images = torch::randn({2, c.in_chans, c.image_size, c.image_size}, torch::kFloat64);
  torch::Tensor logits = model->forward(images).detach();
  ASSERT_EQ(logits.sizes(), (std::vector<int64_t>{2, c.num_classes}));
  for (int64_t b = 0; b < 2; ++b) {
    Vec ref = reference_forward(c, w, images[b]);
    for (int64_t k = 0; k < c.num_classes; ++k)
      EXPECT_NEAR(logits[b][k].item<double>(), ref[static_cast<size_t>(k)], 1e-9 * (1 + std::abs(ref[static_cast<size_t>(k)])))
          << describe(c) << " image " << b << " class " << k;
  }
}

INSTANTIATE_TEST_SUITE_P(Options, ViTMatchesReference, ::testing::ValuesIn(tiny_variants()),
                         [](const ::testing::TestParamInfo<ViTConfig>& info) { return describe(info.param); });

TEST(ViT, NoHeadReturnsPooledFeatures) {
  ViTConfig c = tiny_config();
  c.num_classes = 0;
  VisionTransformer m(c);
  EXPECT_EQ(m->forward(torch::randn({3, 1, 28, 28})).sizes(), (std::vector<int64_t>{3, 32}));
}

// --- Frozen GEMMs through oneDNN ---------------------------------------------------------

TEST(FrozenGemm, ParsesTheThreeSettingsAndNamesABadOne) {
  EXPECT_EQ(ops::parse_frozen_gemm("auto"), FrozenGemm::Auto);
  EXPECT_EQ(ops::parse_frozen_gemm("blas"), FrozenGemm::Blas);
  EXPECT_EQ(ops::parse_frozen_gemm("onednn"), FrozenGemm::OneDnn);
  try {
    ops::parse_frozen_gemm("mkl");
    FAIL() << "no exception";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("train.frozen_gemm=mkl must be auto, onednn, onednn_matmul or blas"), std::string::npos) << e.what();
  }
}

namespace {

// Whether `y`'s GEMM node (under the in-place bias add) is the custom function `name`
// (autograd names it "torch::autograd::CppNode<...::name>").
bool gemm_node_is(const torch::Tensor& y, const std::string& name) {
  auto is = [&](const std::shared_ptr<torch::autograd::Node>& f) {
    return f && f->name().find("::" + name + ">") != std::string::npos;
  };
  if (!y.grad_fn()) return false;
  if (is(y.grad_fn())) return true;
  for (const auto& edge : y.grad_fn()->next_edges())
    if (is(edge.function)) return true;
  return false;
}

}  // namespace

// fp32: the oneDNN inner-product path; bf16: one mm (oneDNN's bf16 GEMM either way) with the
// bias added in place. Each, and torch::linear (the Blas setting), against the same
// computation in float64 on the same (rounded) inputs, in value and gradients.
TEST(FrozenGemm, FastPathsMatchTorchLinearInValueAndGradients) {
  if (!at::hasMKLDNN()) GTEST_SKIP() << "LibTorch without oneDNN";
  torch::manual_seed(3);
  for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
    const bool bf16 = dtype == torch::kBFloat16;
    const torch::Tensor w = (torch::randn({96, 160}) * 0.1).to(dtype);  // frozen: requires_grad false
    const torch::Tensor b0 = torch::randn({96}).to(dtype);
    // 3-D input and a non-contiguous one (a transposed view), as attention outputs are.
    for (bool contiguous : {true, false}) {
      torch::Tensor base = (contiguous ? torch::randn({4, 70, 160}) : torch::randn({4, 160, 70}).transpose(1, 2)).to(dtype);
      auto run = [&](FrozenGemm path, torch::ScalarType t) {
        torch::Tensor x = base.detach().to(t).clone().requires_grad_(true);
        torch::Tensor b = b0.to(t).clone().requires_grad_(true);  // a trainable bias (BitFit)
        torch::Tensor y = cpu_ops(path)->linear(x, w.to(t), b);
        if (t == dtype) EXPECT_EQ(gemm_node_is(y, "FrozenMatmul"), path == FrozenGemm::OneDnn) << y.grad_fn()->name();
        y.narrow(-1, 10, 20).mul_(2.0);  // callers add into the output in place (LoRA on q/v)
        (y * torch::linspace(-1, 1, 96).to(t)).sum().backward();
        return std::vector<torch::Tensor>{y.detach().to(torch::kFloat), x.grad().to(torch::kFloat), b.grad().to(torch::kFloat)};
      };
      const auto exact = run(FrozenGemm::Blas, torch::kDouble);
      std::map<FrozenGemm, std::vector<torch::Tensor>> got;
      for (FrozenGemm path : {FrozenGemm::Blas, FrozenGemm::OneDnn}) got[path] = run(path, dtype);
      // bf16: both round to bf16 (8 bits), the fast path once more (after the GEMM, before the
      // bias). A CPU without AVX-512 BF16 accumulates LibTorch's bf16 GEMMs less exactly (there
      // torch::linear itself is 1.2-1.3% off the exact result, and 1.2% from the fast path), so
      // each is held to the exact result, and the fast path to torch::linear's own accuracy.
      for (size_t i = 0; i < 3; ++i) {
        const std::string what = "tensor " + std::to_string(i) + (bf16 ? " bf16" : " fp32") + (contiguous ? "" : ", strided input");
        const double blas = rel_err(got[FrozenGemm::Blas][i], exact[i]), fast = rel_err(got[FrozenGemm::OneDnn][i], exact[i]);
        EXPECT_LT(blas, bf16 ? 2e-2 : 1e-5) << what << ": torch::linear";
        EXPECT_LT(fast, bf16 ? 2e-2 : 1e-5) << what << ": fast path";
        if (bf16) EXPECT_LE(fast, 1.5 * blas + 1e-3) << what << ": the fast path is less exact than torch::linear";
      }
    }
  }
}

TEST(FrozenGemm, TrainableWeightsAndTinyGemmsKeepTorchLinear) {
  const auto onednn = cpu_ops(FrozenGemm::OneDnn);
  for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
    torch::Tensor x = torch::randn({64, 128}).to(dtype).requires_grad_(true);
    torch::Tensor w = torch::randn({128, 128}).to(dtype).requires_grad_(true);
    torch::Tensor y = onednn->linear(x, w, torch::Tensor());
    EXPECT_EQ(y.grad_fn()->name().find("FrozenMatmul"), std::string::npos) << y.grad_fn()->name();
    torch::Tensor small =
        onednn->linear(torch::randn({2, 8}).to(dtype).requires_grad_(true), torch::randn({4, 8}).to(dtype), {});
    EXPECT_EQ(small.grad_fn()->name().find("FrozenMatmul"), std::string::npos) << small.grad_fn()->name();
  }
}

TEST(FrozenGemm, FrozenViTForwardAndBackwardAgreeOnBothPaths) {
  if (!at::hasMKLDNN()) GTEST_SKIP() << "LibTorch without oneDNN";
  ViTConfig c = tiny_config();
  c.image_size = 56;  // 65 tokens x batch 4: every block GEMM is above the oneDNN size floor
  c.dim = 64;
  c.mlp_dim = 256;
  torch::manual_seed(5);
  VisionTransformer model(c);
  randomize_for_test(*model);
  for (auto& p : model->parameters()) p.set_requires_grad(false);
  const torch::Tensor images = torch::randn({4, 1, 56, 56});
  std::map<FrozenGemm, std::pair<torch::Tensor, torch::Tensor>> got;
  for (FrozenGemm path : {FrozenGemm::Blas, FrozenGemm::OneDnn}) {
    set_ops(*model, cpu_ops(path));
    torch::Tensor x = images.clone().requires_grad_(true);  // the gradient crosses every layer
    torch::Tensor logits = model->forward(x);
    logits.pow(2).sum().backward();
    got[path] = {logits.detach(), x.grad()};
  }
  EXPECT_LT(rel_err(got[FrozenGemm::OneDnn].first, got[FrozenGemm::Blas].first), 1e-5);
  EXPECT_LT(rel_err(got[FrozenGemm::OneDnn].second, got[FrozenGemm::Blas].second), 1e-5);
}

// The last block computes only the cls token under cls pooling; every logit and every
// parameter gradient must equal the full computation's.
TEST(ViT, ClsOnlyLastBlockEqualsTheFullBlockInValueAndGradient) {
  for (const ViTConfig& c : tiny_variants()) {
    torch::manual_seed(7);
    VisionTransformer model(c);
    randomize_for_test(*model);
    model->to(torch::kFloat64);
    const torch::Tensor images = torch::randn({3, c.in_chans, c.image_size, c.image_size}, torch::kFloat64);
    auto run = [&](bool pruned) {
      model->zero_grad();
      torch::Tensor logits;
      if (pruned) {
        logits = model->forward(images);
      } else {
        torch::Tensor x = model->embed(images);
        for (size_t i = 0; i < model->num_blocks(); ++i) x = model->block(i)->forward(x);  // every token
        logits = model->head_forward(x);
      }
      (logits * torch::arange(logits.numel(), torch::kFloat64).view_as(logits)).sum().backward();
      std::map<std::string, torch::Tensor> out{{"logits", logits.detach()}};
      for (const auto& p : model->named_parameters())
        if (p.value().grad().defined()) out[p.key()] = p.value().grad().clone();
      return out;
    };
    auto full = run(false), pruned = run(true);
    ASSERT_EQ(full.size(), pruned.size()) << describe(c);
    for (const auto& [name, t] : full) {
      ASSERT_TRUE(pruned.count(name)) << describe(c) << " " << name;
      EXPECT_TRUE(torch::allclose(pruned[name], t, 1e-10, 1e-12)) << describe(c) << " " << name;
    }
  }
}

// Attention splits q, k, v with its own autograd function (one copy per part, gradients
// written straight into the qkv layout). Against the same attention composed from plain
// autograd ops, in float64: output, input gradient and every parameter gradient, for every
// model variant (qk_norm included) and for the cls-only query case.
TEST(ViT, AttentionSplitMatchesPlainAutograd) {
  for (const ViTConfig& c : tiny_variants()) {
    for (int64_t queries : {0, 1, 3}) {
      torch::manual_seed(21);
      Attention attn(c, ops::default_ops());
      randomize_for_test(*attn);
      attn->to(torch::kDouble);
      const int64_t B = 3, N = 7, D = c.dim, H = c.heads, hd = D / H;
      const torch::Tensor x0 = torch::randn({B, N, D}, torch::kDouble);
      const int64_t Q = queries > 0 ? queries : N;
      const torch::Tensor r = torch::randn({B, Q, D}, torch::kDouble);

      auto run = [&](bool plain) {
        for (auto& p : attn->parameters()) p.mutable_grad() = torch::Tensor();
        torch::Tensor x = x0.clone().requires_grad_(true);
        torch::Tensor out;
        if (!plain) {
          out = attn->forward(x, queries);
        } else {
          auto* qkv = dynamic_cast<DenseLinear*>(attn->qkv.get());
          auto* proj = dynamic_cast<DenseLinear*>(attn->proj.get());
          auto parts = torch::linear(x, qkv->weight, qkv->bias).view({B, N, 3, H, hd}).permute({2, 0, 3, 1, 4});
          torch::Tensor q = parts[0].narrow(2, 0, Q), k = parts[1], v = parts[2];
          if (c.qk_norm) {
            auto* qn = dynamic_cast<LayerNormOp*>(attn->q_norm.get());
            auto* kn = dynamic_cast<LayerNormOp*>(attn->k_norm.get());
            q = torch::layer_norm(q, {hd}, qn->weight, qn->bias, 1e-6);
            k = torch::layer_norm(k, {hd}, kn->weight, kn->bias, 1e-6);
          }
          torch::Tensor a = torch::softmax(torch::matmul(q / std::sqrt(double(hd)), k.transpose(-2, -1)), -1);
          out = torch::linear(torch::matmul(a, v).transpose(1, 2).reshape({B, Q, D}), proj->weight, proj->bias);
        }
        (out * r).sum().backward();
        std::vector<torch::Tensor> got{out.detach(), x.grad()};
        for (auto& p : attn->parameters()) got.push_back(p.grad().clone());
        return got;
      };
      const auto fast = run(false), plain = run(true);
      ASSERT_EQ(fast.size(), plain.size());
      // Relative, with a floor of 1: k_norm's bias has an exact zero gradient (it shifts
      // every score of a query alike), which both sides reach only to rounding.
      for (size_t i = 0; i < fast.size(); ++i)
        EXPECT_LT((fast[i] - plain[i]).norm().item<double>(), 1e-12 * std::max(1.0, plain[i].norm().item<double>()))
            << describe(c) << " queries " << queries << " tensor " << i;
    }
  }
}

// The patch embedding as one GEMM over flattened patches equals the strided convolution, in
// value and in the gradients of the images and of a training weight and bias, at fp32 on both
// frozen-GEMM paths and at bf16; pixels past the last whole patch are dropped as by the
// convolution.
TEST(ViT, PatchEmbedGemmEqualsTheStridedConvolution) {
  ViTConfig c = tiny_config();
  c.in_chans = 3;
  for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
    for (FrozenGemm path : {FrozenGemm::OneDnn, FrozenGemm::Blas}) {
      for (bool trainable : {false, true}) {
        SCOPED_TRACE(std::string(dtype == torch::kFloat ? "fp32 " : "bf16 ") + ops::frozen_gemm_name(path) +
                     (trainable ? " trainable" : " frozen"));
        torch::manual_seed(8);
        PatchEmbed pe(c, cpu_ops(path, 0));
        pe->proj->weight.requires_grad_(trainable);
        pe->proj->bias.requires_grad_(trainable);
        torch::Tensor images = torch::randn({2, 3, 30, 29}).to(dtype).requires_grad_(true);  // 4x4 patches of 7
        torch::Tensor y = pe->forward(images);
        ASSERT_EQ(y.sizes(), (std::vector<int64_t>{2, 16, c.dim}));
        torch::Tensor img64 = images.detach().to(torch::kDouble).requires_grad_(true);
        torch::Tensor w64 = pe->proj->weight.detach().to(torch::kDouble).requires_grad_(true);
        torch::Tensor b64 = pe->proj->bias.detach().to(torch::kDouble).requires_grad_(true);
        torch::Tensor want = torch::conv2d(img64, w64, b64, {7, 7}).flatten(2).transpose(1, 2);
        torch::Tensor g = torch::randn(want.sizes(), torch::kDouble);
        (y.to(torch::kDouble) * g).sum().backward();
        (want * g).sum().backward();
        const double tol = dtype == torch::kFloat ? 1e-5 : 2e-2;
        EXPECT_LT(rel_err(y.to(torch::kDouble), want), tol);
        EXPECT_LT(rel_err(images.grad().to(torch::kDouble), img64.grad()), tol);
        // The dropped pixels (row 28-29, column 28) get no gradient.
        EXPECT_EQ(images.grad().narrow(2, 28, 2).abs().sum().item<double>(), 0.0);
        EXPECT_EQ(images.grad().narrow(3, 28, 1).abs().sum().item<double>(), 0.0);
        if (trainable) {
          EXPECT_LT(rel_err(pe->proj->weight.grad().to(torch::kDouble), w64.grad()), tol);
          EXPECT_LT(rel_err(pe->proj->bias.grad().to(torch::kDouble), b64.grad()), tol);
        }
      }
    }
  }
}
