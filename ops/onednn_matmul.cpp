#include "ops/onednn_matmul.h"

#include <ATen/Parallel.h>

#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>

#ifdef SHARDTUNE_HAVE_ONEDNN
#include <oneapi/dnnl/dnnl.hpp>
#endif

namespace shardtune::ops {

namespace {

std::string describe(const torch::Tensor& t) {
  std::ostringstream o;
  o << t.sizes() << " " << t.scalar_type() << " strides " << t.strides();
  return o.str();
}

// The operand as oneDNN can read it in place: its last two dims must be row-major or
// transposed (one of them unit-stride); anything else is copied contiguous first.
torch::Tensor readable(const torch::Tensor& t) {
  const int64_t d = t.dim();
  if (t.stride(d - 1) == 1 || t.stride(d - 2) == 1) return t;
  return t.contiguous();
}

void check(const torch::Tensor& c, const torch::Tensor& a, const torch::Tensor& b) {
  auto bad = [&](const std::string& why) {
    throw std::invalid_argument("onednn_matmul: " + why + " (a " + describe(a) + ", b " + describe(b) + ", c " +
                                describe(c) + ")");
  };
  if (!a.device().is_cpu() || !b.device().is_cpu() || !c.device().is_cpu()) bad("CPU tensors only");
  const auto dt = a.scalar_type();
  if ((dt != torch::kFloat && dt != torch::kBFloat16) || b.scalar_type() != dt || c.scalar_type() != dt)
    bad("fp32 or bf16, all three the same");
  if (a.dim() < 2 || b.dim() != a.dim() || c.dim() != a.dim()) bad("the same number (>= 2) of dims");
  const int64_t d = a.dim();
  if (a.sizes().slice(0, d - 2) != b.sizes().slice(0, d - 2) || c.sizes().slice(0, d - 2) != a.sizes().slice(0, d - 2))
    bad("the same batch dims");
  if (a.size(d - 1) != b.size(d - 2) || c.size(d - 2) != a.size(d - 2) || c.size(d - 1) != b.size(d - 1))
    bad("shapes that do not multiply");
  if (!c.is_contiguous()) bad("a contiguous output");
}

}  // namespace

#ifdef SHARDTUNE_HAVE_ONEDNN

namespace {

dnnl::memory::desc desc_of(const torch::Tensor& t) {
  const auto dt = t.scalar_type() == torch::kFloat ? dnnl::memory::data_type::f32 : dnnl::memory::data_type::bf16;
  return dnnl::memory::desc(dnnl::memory::dims(t.sizes().begin(), t.sizes().end()), dt,
                            dnnl::memory::dims(t.strides().begin(), t.strides().end()));
}

// One primitive per (dtype, shapes, strides, threads), made at the first call: oneDNN's JIT
// code generation costs milliseconds, a call on a cached primitive microseconds.
class Primitives {
 public:
  Primitives() : engine_(dnnl::engine::kind::cpu, 0) {}

  void run(const torch::Tensor& c, const torch::Tensor& a, const torch::Tensor& b) {
    std::ostringstream key;
    key << a.scalar_type() << a.sizes() << a.strides() << b.sizes() << b.strides() << c.strides() << " t"
        << at::get_num_threads();
    const dnnl::memory::desc ad = desc_of(a), bd = desc_of(b), cd = desc_of(c);
    std::shared_ptr<dnnl::matmul> prim;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto& slot = cache_[key.str()];
      if (!slot) {
        try {
          slot = std::make_shared<dnnl::matmul>(dnnl::matmul::primitive_desc(dnnl::matmul::desc(ad, bd, cd), engine_));
        } catch (const dnnl::error& e) {
          cache_.erase(key.str());
          throw std::runtime_error(std::string("onednn_matmul: oneDNN has no matmul for a ") + describe(a) + " and b " +
                                   describe(b) + ": " + e.what());
        }
      }
      prim = slot;
    }
    // The data pointers are const-cast for oneDNN's API; it reads a and b only.
    dnnl::memory am(ad, engine_, const_cast<void*>(a.data_ptr())), bm(bd, engine_, const_cast<void*>(b.data_ptr())),
        cm(cd, engine_, c.data_ptr());
    dnnl::stream s(engine_);
    prim->execute(s, {{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm}, {DNNL_ARG_DST, cm}});
    s.wait();
  }

 private:
  dnnl::engine engine_;
  std::mutex mutex_;
  std::map<std::string, std::shared_ptr<dnnl::matmul>> cache_;
};

Primitives& primitives() {
  static Primitives p;
  return p;
}

}  // namespace

bool onednn_matmul_available() { return true; }

void onednn_matmul_out(const torch::Tensor& c, const torch::Tensor& a, const torch::Tensor& b) {
  check(c, a, b);
  if (c.numel() == 0) return;
  if (a.size(-1) == 0) {
    c.zero_();
    return;
  }
  primitives().run(c, readable(a), readable(b));
}

#else  // no oneDNN headers at build time

bool onednn_matmul_available() { return false; }

void onednn_matmul_out(const torch::Tensor& c, const torch::Tensor& a, const torch::Tensor& b) {
  check(c, a, b);
  throw std::runtime_error("onednn_matmul: this build has no oneDNN headers (Debian: libdnnl-dev)");
}

#endif

torch::Tensor onednn_matmul(const torch::Tensor& a, const torch::Tensor& b) {
  std::vector<int64_t> shape = a.sizes().vec();
  if (b.dim() >= 1) shape.back() = b.size(-1);
  torch::Tensor c = torch::empty(shape, a.options());
  onednn_matmul_out(c, a, b);
  return c;
}

}  // namespace shardtune::ops
