// The AVX-512 kernels (ops/cpu_kernels.h), bf16 and fp32, against LibTorch computed in fp32 and
// double, on widths that exercise whole vectors, a masked tail and both; and the ViT step
// with the kernels on against the same step with LibTorch's ops.
#include <c10/core/CPUAllocator.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <torch/torch.h>
#include <unistd.h>

#include <set>
#include <string>
#include <vector>

#include "ops/cpu_kernels.h"
#include "peft/method.h"
#include "tiny.h"

namespace shardtune {
namespace {

#define SKIP_WITHOUT_AVX512_BF16()                                                       \
  if (!kernels::available()) GTEST_SKIP() << "this CPU has no AVX-512 BF16: kernels off"

const auto bf = torch::kBFloat16;
const auto f64 = torch::kDouble;

// |a - b| <= tol * (|b| + floor): a bf16 result against an exact reference, elementwise.
void expect_close(const torch::Tensor& got, const torch::Tensor& want, double tol, double floor,
                  const std::string& what) {
  ASSERT_EQ(got.sizes(), want.sizes()) << what;
  torch::Tensor g = got.to(f64), w = want.to(f64);
  torch::Tensor bad = (g - w).abs() > (w.abs() + floor) * tol;
  EXPECT_EQ(bad.sum().item<int64_t>(), 0) << what << ": worst |diff| " << (g - w).abs().max().item<double>()
                                          << " (max |want| " << w.abs().max().item<double>() << ")";
}

// LayerNorm in float64 from the same input, with autograd: y and the gradients for dy.
struct LayerNormReference {
  torch::Tensor y, dx, dweight, dbias;
};
LayerNormReference layer_norm_reference(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b,
                                        const torch::Tensor& dy) {
  torch::Tensor xr = x.to(f64).requires_grad_(true), wr = w.to(f64).requires_grad_(true),
                br = b.to(f64).requires_grad_(true);
  torch::Tensor yr = torch::layer_norm(xr, {x.size(-1)}, wr, br, 1e-6);
  yr.backward(dy.to(f64));
  return {yr.detach(), xr.grad(), wr.grad(), br.grad()};
}

TEST(Kernels, EligibleOnlyForContiguousBf16OrFp32) {
  SKIP_WITHOUT_AVX512_BF16();
  torch::Tensor t = torch::randn({4, 6}).to(bf);
  EXPECT_TRUE(kernels::eligible(t));
  EXPECT_FALSE(kernels::eligible(t.t()));
  EXPECT_TRUE(kernels::eligible(t.to(torch::kFloat)));
  EXPECT_FALSE(kernels::eligible(t.to(torch::kFloat).t()));
  EXPECT_FALSE(kernels::eligible(t.to(torch::kDouble)));
  EXPECT_FALSE(kernels::eligible(t.to(torch::kHalf)));
  EXPECT_FALSE(kernels::eligible(torch::Tensor()));
  EXPECT_THROW(kernels::add(t, t.to(torch::kFloat)), c10::Error);  // one dtype per call
  EXPECT_THROW(kernels::softmax_lastdim(t.t()), c10::Error);
  EXPECT_THROW(kernels::softmax_lastdim(t, 0.0), c10::Error);
  EXPECT_THROW(kernels::layer_norm(t, torch::ones({5}), torch::zeros({6}), 1e-6), c10::Error);
}

TEST(Kernels, SoftmaxMatchesExactSoftmaxToBf16Rounding) {
  SKIP_WITHOUT_AVX512_BF16();
  torch::manual_seed(0);
  for (int64_t n : {1, 5, 16, 31, 197, 1000}) {
    SCOPED_TRACE("width " + std::to_string(n));
    torch::Tensor x = (torch::randn({3, 7, n}) * 4).to(bf);
    x.select(1, 2).fill_(-30);  // a row of equal values
    torch::Tensor y = kernels::softmax_lastdim(x);
    ASSERT_EQ(y.scalar_type(), bf);
    torch::Tensor want = x.to(f64).softmax(-1);
    // With a scale (the attention's, applied inside): softmax(scale * x) and its gradient.
    const double attn_scale = 0.1066;
    torch::Tensor xs = x.to(f64).requires_grad_(true);
    torch::Tensor want_s = (xs * attn_scale).softmax(-1);
    torch::Tensor ys = kernels::softmax_lastdim(x, attn_scale);
    expect_close(ys, want_s.detach(), 1.0 / 256, 1e-30, "scaled softmax");
    torch::Tensor dys = torch::randn({3, 7, n}).to(bf);
    want_s.backward(dys.to(f64));
    torch::Tensor dxs = kernels::softmax_lastdim_backward(ys, dys, attn_scale);
    torch::Tensor scale_s = (ys.to(f64) * dys.to(f64).abs()).amax(-1, true).expand_as(xs) * attn_scale;
    EXPECT_LE(((dxs.to(f64) - xs.grad()).abs() / (scale_s + 1e-30)).max().item<double>(), 2.0 / 256);
    // One rounding to bf16 (2^-9 relative) plus the fp32 arithmetic.
    expect_close(y, want, 1.0 / 256, 1e-30, "softmax");
    expect_close(y.to(f64).sum(-1), torch::ones({3, 7}, f64), 1.0 / 64, 0, "row sums");

    torch::Tensor dy = torch::randn({3, 7, n}).to(bf);
    torch::Tensor dx = kernels::softmax_lastdim_backward(y, dy);
    torch::Tensor yd = y.to(f64), dyd = dy.to(f64);
    torch::Tensor want_dx = yd * (dyd - (yd * dyd).sum(-1, true));
    // Relative to the row's largest |y * dy| terms, since dx cancels.
    torch::Tensor scale = (yd * dyd.abs()).amax(-1, true).expand_as(want_dx);
    EXPECT_LE(((dx.to(f64) - want_dx).abs() / (scale + 1e-30)).max().item<double>(), 2.0 / 256);
  }
}

TEST(Kernels, LayerNormMatchesFp32LayerNormWithGradients) {
  SKIP_WITHOUT_AVX512_BF16();
  torch::manual_seed(2);
  for (int64_t n : {8, 13, 64, 768, 1030}) {
    SCOPED_TRACE("width " + std::to_string(n));
    torch::Tensor x = (torch::randn({5, 11, n}) * 3 + 1).to(bf);
    torch::Tensor w = torch::rand({n}) + 0.5, b = torch::randn({n});
    torch::Tensor dy = torch::randn({5, 11, n}).to(bf);
    auto [y, mean, rstd] = kernels::layer_norm(x, w, b, 1e-6);
    ASSERT_EQ(y.scalar_type(), bf);
    const LayerNormReference ref = layer_norm_reference(x, w, b, dy);
    expect_close(y, ref.y, 1.0 / 128, 0.05, "y");
    expect_close(mean, x.to(f64).mean(-1).view({-1}), 1e-5, 1e-3, "mean");

    auto grads = kernels::layer_norm_backward(dy, x, w, mean, rstd, true, true);
    ASSERT_EQ(grads.dx.scalar_type(), bf);
    expect_close(grads.dx, ref.dx, 1.0 / 64, 0.1 * ref.dx.abs().max().item<double>(), "dx");
    expect_close(grads.dweight, ref.dweight, 1e-4, 1e-2, "dweight");
    expect_close(grads.dbias, ref.dbias, 1e-4, 1e-2, "dbias");
    auto only_dx = kernels::layer_norm_backward(dy, x, w, mean, rstd, false, false);
    EXPECT_TRUE(torch::equal(only_dx.dx, grads.dx));
    EXPECT_FALSE(only_dx.dweight.defined());
    EXPECT_FALSE(only_dx.dbias.defined());
  }
}

TEST(Kernels, GeluMatchesExactGeluWithGradient) {
  SKIP_WITHOUT_AVX512_BF16();
  torch::manual_seed(7);
  for (int64_t n : {1, 15, 16, 100003}) {
    SCOPED_TRACE("elements " + std::to_string(n));
    torch::Tensor x = (torch::randn({n}) * 3).to(bf);
    if (n > 16) x.narrow(0, 0, 9).copy_(torch::tensor({-12.0, -6.0, -5.0, -1.0, 0.0, 1e-3, 1.0, 5.0, 12.0}));
    torch::Tensor xd = x.to(f64).requires_grad_(true);
    torch::Tensor want = 0.5 * xd * (1 + torch::erf(xd / std::sqrt(2.0)));
    torch::Tensor dy = torch::randn({n}).to(bf);
    want.backward(dy.to(f64));
    // One bf16 rounding, and in the far negative tail (|gelu| < 1e-5) an absolute error under
    // 2e-6: the rational erf is good to ~4e-7 absolute, which 1 + erf(x) there magnifies.
    expect_close(kernels::gelu(x), want.detach(), 1.0 / 128, 2.5e-4, "gelu");
    expect_close(kernels::gelu_backward(dy, x), xd.grad(), 1.0 / 128, 2.5e-4, "gelu backward");
  }
}

TEST(Kernels, AddIsOneFp32AddRoundedOnce) {
  SKIP_WITHOUT_AVX512_BF16();
  torch::manual_seed(9);
  for (int64_t n : {1, 16, 17, 4099}) {
    torch::Tensor a = torch::randn({3, n}).to(bf), b = (torch::randn({3, n}) * 100).to(bf);
    EXPECT_TRUE(torch::equal(kernels::add(a, b), (a.to(torch::kFloat) + b.to(torch::kFloat)).to(bf))) << n;
  }
  try {
    kernels::add(torch::zeros({2, 3}).to(bf), torch::zeros({3, 2}).to(bf));
    ADD_FAILURE() << "a sum of [2, 3] and [3, 2] was accepted";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what_without_backtrace()).find("summand [3, 2] BFloat16 does not match summand [2, 3] BFloat16"),
              std::string::npos)
        << e.what_without_backtrace();
  }
}

TEST(Kernels, BiasAddIsOneFp32AddRoundedOnce) {
  SKIP_WITHOUT_AVX512_BF16();
  torch::manual_seed(3);
  for (int64_t n : {3, 16, 2304, 3077}) {
    torch::Tensor y = torch::randn({4, 9, n}).to(bf), b = torch::randn({n}).to(bf);
    torch::Tensor want = (y.to(torch::kFloat) + b.to(torch::kFloat)).to(bf);
    torch::Tensor got = y.clone();
    kernels::add_bias_(got, b);
    EXPECT_TRUE(torch::equal(got, want)) << "width " << n;
    torch::Tensor got32 = y.clone();
    kernels::add_bias_(got32, b.to(torch::kFloat));  // fp32 bias: the same values
    EXPECT_TRUE(torch::equal(got32, want)) << "width " << n;
  }
}

// The fp32 instances of every kernel against float64: a few fp32 ulps (the polynomial exp and
// rational erf), the adds bit-identical to one fp32 add.
TEST(Kernels, Fp32KernelsMatchFloat64) {
  SKIP_WITHOUT_AVX512_BF16();
  const auto f32 = torch::kFloat;
  torch::manual_seed(11);
  for (int64_t n : {1, 5, 16, 31, 197, 768, 1030}) {
    SCOPED_TRACE("width " + std::to_string(n));
    // softmax(scale * x) and its backward
    torch::Tensor x = torch::randn({3, 7, n}) * 4;
    const double attn_scale = 0.125;
    torch::Tensor xs = x.to(f64).requires_grad_(true);
    torch::Tensor want = (xs * attn_scale).softmax(-1);
    torch::Tensor y = kernels::softmax_lastdim(x, attn_scale);
    ASSERT_EQ(y.scalar_type(), f32);
    expect_close(y, want.detach(), 2e-6, 1e-30, "softmax");
    torch::Tensor dy = torch::randn({3, 7, n});
    want.backward(dy.to(f64));
    torch::Tensor dx = kernels::softmax_lastdim_backward(y, dy, attn_scale);
    torch::Tensor row_scale = (want.detach() * dy.to(f64).abs()).amax(-1, true).expand_as(xs) * attn_scale;
    EXPECT_LE(((dx.to(f64) - xs.grad()).abs() / (row_scale + 1e-30)).max().item<double>(), 1e-5);

    // LayerNorm with every gradient
    torch::Tensor h = torch::randn({5, 11, n}) * 3 + 1, w = torch::rand({n}) + 0.5, b = torch::randn({n});
    torch::Tensor dh = torch::randn({5, 11, n});
    auto [hy, mean, rstd] = kernels::layer_norm(h, w, b, 1e-6);
    ASSERT_EQ(hy.scalar_type(), f32);
    const LayerNormReference ref = layer_norm_reference(h, w, b, dh);
    if (n > 1) {  // one element: y = b exactly, and dx = 0 with rounding noise only
      expect_close(hy, ref.y, 1e-5, 1.0, "LayerNorm y");  // 1e-5 relative, 1e-5 absolute
      auto g = kernels::layer_norm_backward(dh, h, w, mean, rstd, true, true);
      ASSERT_EQ(g.dx.scalar_type(), f32);
      expect_close(g.dx, ref.dx, 1e-4, 1e-3 * ref.dx.abs().max().item<double>(), "LayerNorm dx");
      expect_close(g.dweight, ref.dweight, 1e-5, 0.01 * ref.dweight.abs().max().item<double>(), "LayerNorm dweight");
      expect_close(g.dbias, ref.dbias, 1e-5, 0.01 * ref.dbias.abs().max().item<double>(), "LayerNorm dbias");
    }

    // GELU and its backward, tails included
    torch::Tensor u = torch::randn({9 * n}) * 3;
    if (u.numel() >= 9) u.narrow(0, 0, 9).copy_(torch::tensor({-12.0, -6.0, -5.0, -1.0, 0.0, 1e-3, 1.0, 5.0, 12.0}));
    torch::Tensor ud = u.to(f64).requires_grad_(true);
    torch::Tensor gelu = 0.5 * ud * (1 + torch::erf(ud / std::sqrt(2.0)));
    torch::Tensor du = torch::randn({9 * n});
    gelu.backward(du.to(f64));
    // 1e-5 relative, and 2e-6 absolute: the rational erf is good to ~4e-7 absolute, which
    // 1 + erf(x) magnifies relatively in the negative tail (LibTorch's libm erff: ~6e-8).
    expect_close(kernels::gelu(u), gelu.detach(), 1e-5, 0.2, "gelu");
    expect_close(kernels::gelu_backward(du, u), ud.grad(), 1e-5, 0.2, "gelu backward");

    // the adds: exactly LibTorch's fp32 add
    torch::Tensor a = torch::randn({3, n}), c = torch::randn({3, n}) * 100;
    EXPECT_TRUE(torch::equal(kernels::add(a, c), a + c));
    torch::Tensor bias = torch::randn({n}), biased = a.clone();
    kernels::add_bias_(biased, bias);
    EXPECT_TRUE(torch::equal(biased, a + bias));
  }
}

bool graph_has(const torch::Tensor& t, const std::string& name);  // below

// The fp32 step through the kernels (forced on) against float64: as close as LibTorch's ops are.
TEST(Kernels, ViTFp32StepThroughTheKernelsEqualsFloat64) {
  SKIP_WITHOUT_AVX512_BF16();
  for (const ViTConfig& c : tiny_variants()) {
    SCOPED_TRACE(describe(c));
    auto run = [&, c = c](bool kernels, torch::ScalarType dtype) {
      torch::manual_seed(4);
      VisionTransformer model(c);
      randomize_for_test(*model);
      PeftConfig p;
      p.method = "lora";
      PeftState state = apply_peft(*model, p);
      set_ops(*model, cpu_ops(FrozenGemm::OneDnn, 0, kernels, /*fp32_kernels=*/kernels));
      {
        torch::NoGradGuard no_grad;
        for (auto& [name, t] : state.trainable) t.normal_(0, 0.3);
      }
      if (dtype == f64) model->to(f64);
      torch::manual_seed(5);
      torch::Tensor logits = model->forward(torch::randn({3, c.in_chans, c.image_size, c.image_size}).to(dtype));
      for (const char* node : {"SoftmaxAvx512", "LayerNormAvx512", "GeluAvx512", "ResidualAddAvx512"})
        EXPECT_EQ(graph_has(logits, node), kernels && dtype == torch::kFloat) << node;
      logits = logits.to(f64);
      torch::cross_entropy_loss(logits, torch::tensor({0, 1, 2})).backward();
      std::vector<torch::Tensor> out{logits.detach()};
      for (auto& [name, t] : state.trainable) out.push_back(t.grad().to(f64));
      return out;
    };
    const auto on = run(true, torch::kFloat), off = run(false, torch::kFloat), exact = run(false, f64);
    ASSERT_EQ(on.size(), exact.size());
    for (size_t i = 0; i < on.size(); ++i) {
      SCOPED_TRACE(i == 0 ? "logits" : "gradient " + std::to_string(i));
      const double err_on = rel_err(on[i], exact[i]), err_off = rel_err(off[i], exact[i]);
      EXPECT_LT(err_on, 1e-5) << "LibTorch's path: " << err_off;
    }
  }
}

// Whether any node of t's autograd graph has `name` in its name.
bool graph_has(const torch::Tensor& t, const std::string& name) {
  std::vector<torch::autograd::Node*> todo{t.grad_fn().get()};
  std::set<torch::autograd::Node*> seen;
  while (!todo.empty()) {
    torch::autograd::Node* n = todo.back();
    todo.pop_back();
    if (!n || !seen.insert(n).second) continue;
    if (n->name().find(name) != std::string::npos) return true;
    for (const auto& e : n->next_edges()) todo.push_back(e.function.get());
  }
  return false;
}

// The whole bf16 step through the model, kernels on and off (LibTorch's softmax, fp32-cast
// LayerNorm, GELU, add and add_), each against the same step in float64: the logits and the
// trainable gradients of the kernel path are as close to it as LibTorch's path (both round to
// bf16 throughout, at different places: e.g. the kernel applies the attention scale to the
// scores in fp32, LibTorch's path to q in bf16).
TEST(Kernels, ViTBf16StepIsAsAccurateAsLibTorchOps) {
  SKIP_WITHOUT_AVX512_BF16();
  std::vector<std::pair<ViTConfig, std::string>> cases;
  for (const ViTConfig& c : tiny_variants()) cases.emplace_back(c, "lora");
  for (std::string method : {"bitfit", "ln_tune", "ssf"}) cases.emplace_back(tiny_config(), method);
  enum class Mode { KernelsOn, KernelsOff, Float64 };
  for (const auto& [c, method] : cases) {
    SCOPED_TRACE(describe(c) + " " + method);
    auto run = [&, c = c, method = method](Mode mode) {
      torch::manual_seed(4);
      VisionTransformer model(c);
      randomize_for_test(*model);
      PeftConfig p;
      p.method = method;
      PeftState state = apply_peft(*model, p);
      // oneDNN down to the tiny GEMMs (the in-place bias path), kernels on or off
      set_ops(*model, cpu_ops(FrozenGemm::OneDnn, 0, mode == Mode::KernelsOn));
      {
        torch::NoGradGuard no_grad;
        for (auto& [name, t] : state.trainable) t.normal_(0, 0.3);  // LoRA's B starts at zero
      }
      const auto dtype = mode == Mode::Float64 ? torch::kDouble : bf;
      if (mode == Mode::Float64)
        model->to(torch::kDouble);
      else
        cast_frozen(*model, bf);
      torch::manual_seed(5);
      torch::Tensor images = torch::randn({3, c.in_chans, c.image_size, c.image_size}).to(dtype);
      torch::Tensor logits = model->forward(images).to(torch::kDouble);
      const bool on = mode == Mode::KernelsOn;
      for (const char* node : {"SoftmaxAvx512", "LayerNormAvx512", "GeluAvx512", "ResidualAddAvx512"})
        EXPECT_EQ(graph_has(logits, node), on) << node;
      torch::cross_entropy_loss(logits, torch::tensor({0, 1, 2})).backward();
      std::vector<torch::Tensor> out{logits.detach()};
      for (auto& [name, t] : state.trainable) out.push_back(t.grad().to(torch::kDouble));
      return out;
    };
    auto on = run(Mode::KernelsOn), off = run(Mode::KernelsOff), exact = run(Mode::Float64);
    ASSERT_EQ(on.size(), exact.size());
    ASSERT_EQ(off.size(), exact.size());
    // Per output the two bf16 paths' errors scatter around each other (3-5% here: the
    // randomised weights make large activations); over all outputs the kernels' is no larger.
    double sum_on = 0, sum_off = 0;
    for (size_t i = 0; i < on.size(); ++i) {
      SCOPED_TRACE(i == 0 ? "logits" : "gradient " + std::to_string(i));
      EXPECT_GT(exact[i].abs().max().item<double>(), 0.0);
      const double err_on = rel_err(on[i], exact[i]), err_off = rel_err(off[i], exact[i]);
      EXPECT_LT(err_on, 1.6 * err_off + 0.005) << "LibTorch's path: " << err_off;
      EXPECT_LT(err_on, 0.15);
      sum_on += err_on;
      sum_off += err_off;
    }
    EXPECT_LT(sum_on, 1.2 * sum_off + 0.002 * static_cast<double>(on.size()));
  }
}

// LayerNorm weights that train (e.g. LN tuning): the kernel's weight and bias gradients reach
// them through the model's LayerNormOp as LibTorch's would.
TEST(Kernels, LayerNormOpTrainsItsWeightThroughTheKernel) {
  SKIP_WITHOUT_AVX512_BF16();
  auto run = [](bool on) {
    torch::manual_seed(6);
    LayerNormOp ln(24, cpu_ops(FrozenGemm::OneDnn, ops::kMinTunedMacs, on));
    ln.weight.data().uniform_(0.5, 1.5);
    ln.bias.data().normal_();
    torch::Tensor x = torch::randn({4, 7, 24}).to(bf).requires_grad_(true);
    torch::Tensor y = ln.forward(x);
    EXPECT_EQ(y.scalar_type(), bf);
    (y.to(torch::kFloat) * torch::linspace(-1, 1, 24)).sum().backward();
    return std::vector<torch::Tensor>{y.detach(), x.grad(), ln.weight.grad(), ln.bias.grad()};
  };
  auto on = run(true), off = run(false);
  for (size_t i = 0; i < on.size(); ++i) {
    SCOPED_TRACE("output " + std::to_string(i));
    ASSERT_TRUE(on[i].defined());
    EXPECT_EQ(on[i].scalar_type(), off[i].scalar_type());
    EXPECT_LT(rel_err(on[i].to(torch::kFloat), off[i].to(torch::kFloat)), 0.01);
  }
}

// --- tails against guard pages -------------------------------------------------------------
// ASan does not check masked AVX-512 loads and stores, so the kernels' tails are checked the
// way a hardware fault would: every CPU tensor made while a GuardPages scope lives is placed
// flush against a PROT_NONE page (after its last byte, or before its first), so a load or
// store one element past either end kills the test with SIGSEGV.
class GuardPageAllocator final : public c10::Allocator {
 public:
  explicit GuardPageAllocator(bool guard_after) : after_(guard_after) {}
  c10::DataPtr allocate(size_t n) const override {
    const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
    const size_t body = (std::max<size_t>(n, 1) + page - 1) / page * page;
    auto* m = new Mapping{nullptr, body + 2 * page};
    m->base = static_cast<char*>(::mmap(nullptr, m->size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (m->base == MAP_FAILED) throw std::bad_alloc();
    ::mprotect(m->base, page, PROT_NONE);
    ::mprotect(m->base + page + body, page, PROT_NONE);
    char* data = after_ ? m->base + page + (body - n) : m->base + page;  // flush against one guard
    return {data, m, &release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }

 private:
  struct Mapping {
    char* base;
    size_t size;
  };
  static void release(void* ctx) {
    auto* m = static_cast<Mapping*>(ctx);
    ::munmap(m->base, m->size);
    delete m;
  }
  bool after_;
};

struct GuardPages {
  explicit GuardPages(bool after) : alloc(after), previous(c10::GetCPUAllocator()) { c10::SetCPUAllocator(&alloc, 255); }
  ~GuardPages() { c10::SetCPUAllocator(previous, 255); }
  GuardPageAllocator alloc;
  c10::Allocator* previous;
};

// The guard itself: a write one element past either end of a tensor faults; inside does not.
TEST(Kernels, GuardPagesCatchAWriteOneElementPastEitherEnd) {
  testing::FLAGS_gtest_death_test_style = "threadsafe";
  for (bool after : {true, false}) {
    auto write = [after](int64_t i) {
      GuardPages guard(after);
      torch::Tensor t = torch::zeros({33}, torch::kBFloat16);
      static_cast<volatile uint16_t*>(t.data_ptr())[i] = 1;
      return t.sum().item<double>();
    };
    EXPECT_NE(write(after ? 32 : 0), 0.0);
    EXPECT_DEATH(write(after ? 33 : -1), "") << (after ? "one past the end" : "one before the start");
  }
}

TEST(Kernels, TailsStayInsideTheirBuffersAtBothEnds) {
  SKIP_WITHOUT_AVX512_BF16();
  torch::manual_seed(9);
  // Widths: under one vector, one vector, one plus a tail, several plus a tail (16 lanes a vector).
  for (auto dt : {bf, torch::kFloat})
  for (int64_t width : {1, 7, 16, 31, 32, 33, 63, 64, 65, 97}) {
    for (bool after : {true, false}) {
      SCOPED_TRACE(std::string(dt == bf ? "bf16" : "fp32") + " width " + std::to_string(width) +
                   (after ? ", guard after" : ", guard before"));
      torch::Tensor x0 = torch::randn({3, width}), dy0 = torch::randn({3, width});
      torch::Tensor w0 = torch::rand({width}) + 0.5, b0 = torch::randn({width});
      torch::Tensor ref_sm = torch::softmax(x0, -1), ref_gelu = torch::gelu(x0), ref_ln = torch::layer_norm(x0, {width}, w0, b0, 1e-6);
      torch::Tensor sm, smb, ln, lndx, g, gb, sum, biased;
      {
        GuardPages guard(after);
        // Every input and output here lives flush against a guard page.
        torch::Tensor x = x0.to(dt), dy = dy0.to(dt), w = w0.clone(), b = b0.clone();
        sm = kernels::softmax_lastdim(x);
        smb = kernels::softmax_lastdim_backward(sm, dy);
        auto [y, mean, rstd] = kernels::layer_norm(x, w, b, 1e-6);
        ln = y;
        lndx = kernels::layer_norm_backward(dy, x, w, mean, rstd, true, true).dx;
        g = kernels::gelu(x);
        gb = kernels::gelu_backward(dy, x);
        sum = kernels::add(x, dy);
        biased = x.clone();
        kernels::add_bias_(biased, b);
        sm = sm.to(torch::kFloat), ln = ln.to(torch::kFloat), g = g.to(torch::kFloat), sum = sum.to(torch::kFloat);
        biased = biased.to(torch::kFloat), smb = smb.to(torch::kFloat), lndx = lndx.to(torch::kFloat), gb = gb.to(torch::kFloat);
      }
      // The values too: a tail that read a neighbour's bytes would show here.
      EXPECT_LT((sm - ref_sm).abs().max().item<double>(), 0.02);
      EXPECT_LT((g - ref_gelu).abs().max().item<double>(), 0.05);
      EXPECT_LT((ln - ref_ln).abs().max().item<double>(), 0.1);
      EXPECT_LT((sum - (x0.to(dt).to(torch::kFloat) + dy0.to(dt).to(torch::kFloat))).abs().max().item<double>(), 0.05);
      EXPECT_LT((biased - (x0.to(dt).to(torch::kFloat) + b0)).abs().max().item<double>(), 0.05);
      EXPECT_TRUE(torch::isfinite(smb).all().item<bool>() && torch::isfinite(lndx).all().item<bool>() &&
                  torch::isfinite(gb).all().item<bool>());
    }
  }
}

}  // namespace
}  // namespace shardtune
