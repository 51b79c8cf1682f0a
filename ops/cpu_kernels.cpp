#include "ops/cpu_kernels.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <immintrin.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

// This file is compiled with -fopenmp: at::parallel_for is an inline `omp parallel` in
// LibTorch's headers, so without it every kernel here would run on one thread.
//
// Only the functions marked ST_AVX512 use AVX-512; they run after the CPU check in
// available(), and the rest of the file is plain x86-64.
#define ST_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// GCC 12's AVX-512 headers pass an `_mm512_undefined_*()` operand to their builtins, which its
// own -Wmaybe-uninitialized then reports at every inlined intrinsic: a known false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace shardtune::kernels {

namespace {


// --- AVX-512 building blocks: 16 lanes of fp32, read from and written to bf16 -------------

ST_AVX512 inline __m512 widen(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
ST_AVX512 inline __m512 load(const uint16_t* p) { return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
ST_AVX512 inline __m512 load(const uint16_t* p, __mmask16 m) { return widen(_mm256_maskz_loadu_epi16(m, p)); }
// Round to nearest even, as c10::BFloat16's own conversion.
ST_AVX512 inline __m256i narrow(__m512 v) { return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)); }
ST_AVX512 inline void store(uint16_t* p, __m512 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow(v)); }
ST_AVX512 inline void store(uint16_t* p, __m512 v, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, narrow(v)); }
ST_AVX512 inline __m512 loadf(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
// The same for fp32 memory: the kernels below are templates over the element type (uint16_t
// holding bf16 bits, or float), with fp32 arithmetic either way.
ST_AVX512 inline __m512 load(const float* p) { return _mm512_loadu_ps(p); }
ST_AVX512 inline __m512 load(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
ST_AVX512 inline void store(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
ST_AVX512 inline void store(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }

// exp(x) to ~1 ulp of fp32: Cephes' expf (x = n ln2 + r, |r| <= ln2/2, degree-7 polynomial in
// r) with the 2^n scaling by vscalefps. NaN propagates (min/max return their second operand
// on NaN); the range is clamped where fp32 underflows to denormals or overflows.
ST_AVX512 inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-87.33654f), x);
  x = _mm512_min_ps(_mm512_set1_ps(88.72283f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// Rows [r0, r1) of n elements each; `full` lanes in whole vectors, `tail` the mask of the rest.
struct RowShape {
  int64_t n, full;
  __mmask16 tail;
  explicit RowShape(int64_t width)
      : n(width), full(width / 16 * 16), tail(static_cast<__mmask16>((1u << (width % 16)) - 1)) {}
};

// --- Softmax ------------------------------------------------------------------------------

template <class T>
ST_AVX512 void softmax_rows(const T* x, T* y, float* buf, float scale, int64_t r0, int64_t r1,
                            RowShape s) {
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * s.n;
    T* yr = y + r * s.n;
    __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < s.full; j += 16) vmax = _mm512_max_ps(vmax, load(xr + j));
    if (s.tail) vmax = _mm512_mask_max_ps(vmax, s.tail, vmax, load(xr + s.full, s.tail));
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t j = 0; j < s.full; j += 16) {
      const __m512 e = exp16(_mm512_mul_ps(_mm512_sub_ps(load(xr + j), mx), vscale));
      _mm512_storeu_ps(buf + j, e);
      vsum = _mm512_add_ps(vsum, e);
    }
    if (s.tail) {
      const __m512 e = exp16(_mm512_mul_ps(_mm512_sub_ps(load(xr + s.full, s.tail), mx), vscale));
      _mm512_mask_storeu_ps(buf + s.full, s.tail, e);
      vsum = _mm512_mask_add_ps(vsum, s.tail, vsum, e);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
    for (int64_t j = 0; j < s.full; j += 16) store(yr + j, _mm512_mul_ps(_mm512_loadu_ps(buf + j), inv));
    if (s.tail) store(yr + s.full, _mm512_mul_ps(loadf(buf + s.full, s.tail), inv), s.tail);
  }
}

template <class T>
ST_AVX512 void softmax_backward_rows(const T* y, const T* dy, T* dx, float scale, int64_t r0,
                                     int64_t r1, RowShape s) {
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o = r * s.n;
    __m512 vdot = _mm512_setzero_ps();
    for (int64_t j = 0; j < s.full; j += 16) vdot = _mm512_fmadd_ps(load(y + o + j), load(dy + o + j), vdot);
    if (s.tail) vdot = _mm512_fmadd_ps(load(y + o + s.full, s.tail), load(dy + o + s.full, s.tail), vdot);
    const __m512 dot = _mm512_set1_ps(_mm512_reduce_add_ps(vdot));
    for (int64_t j = 0; j < s.full; j += 16)
      store(dx + o + j, _mm512_mul_ps(_mm512_mul_ps(load(y + o + j), vscale), _mm512_sub_ps(load(dy + o + j), dot)));
    if (s.tail) {
      const __m512 ys = _mm512_mul_ps(load(y + o + s.full, s.tail), vscale);
      store(dx + o + s.full, _mm512_mul_ps(ys, _mm512_sub_ps(load(dy + o + s.full, s.tail), dot)), s.tail);
    }
  }
}

// --- LayerNorm ----------------------------------------------------------------------------

template <class T>
ST_AVX512 void layer_norm_rows(const T* x, const float* w, const float* b, float eps, T* y,
                               float* mean, float* rstd, float* buf, int64_t r0, int64_t r1, RowShape s) {
  const __m512 inv_n = _mm512_set1_ps(1.0f / static_cast<float>(s.n));
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * s.n;
    T* yr = y + r * s.n;
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t j = 0; j < s.full; j += 16) {
      const __m512 v = load(xr + j);
      _mm512_storeu_ps(buf + j, v);
      vsum = _mm512_add_ps(vsum, v);
    }
    if (s.tail) {
      const __m512 v = load(xr + s.full, s.tail);  // zeros past the row
      _mm512_storeu_ps(buf + s.full, v);
      vsum = _mm512_add_ps(vsum, v);
    }
    const float mu = _mm512_reduce_add_ps(_mm512_mul_ps(vsum, inv_n));
    const __m512 vmu = _mm512_set1_ps(mu);
    __m512 vsq = _mm512_setzero_ps();
    for (int64_t j = 0; j < s.full; j += 16) {
      const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(buf + j), vmu);
      vsq = _mm512_fmadd_ps(d, d, vsq);
    }
    if (s.tail) {
      const __m512 d = _mm512_maskz_sub_ps(s.tail, _mm512_loadu_ps(buf + s.full), vmu);
      vsq = _mm512_fmadd_ps(d, d, vsq);
    }
    const float var = std::max(_mm512_reduce_add_ps(vsq) / static_cast<float>(s.n), 0.0f);
    const float rs = 1.0f / std::sqrt(var + eps);
    mean[r] = mu;
    rstd[r] = rs;
    const __m512 vrs = _mm512_set1_ps(rs);
    for (int64_t j = 0; j < s.full; j += 16) {
      const __m512 xh = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(buf + j), vmu), vrs);
      store(yr + j, _mm512_fmadd_ps(xh, _mm512_loadu_ps(w + j), _mm512_loadu_ps(b + j)));
    }
    if (s.tail) {
      const __m512 xh = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(buf + s.full), vmu), vrs);
      store(yr + s.full, _mm512_fmadd_ps(xh, loadf(w + s.full, s.tail), loadf(b + s.full, s.tail)), s.tail);
    }
  }
}

// One vector of a LayerNorm backward row: the sums of g = dy * w and g * xh, and the weight and
// bias gradients when given (dw, db non-null).
template <class T>
struct LnBackRow {
  const T *x, *dy;
  const float* w;
  __m512 mu, rs;
};

template <class T>
ST_AVX512 inline void ln_back_accumulate(const LnBackRow<T>& row, int64_t j, __mmask16 m, __m512& vg, __m512& vgx,
                                         float* dw, float* db) {
  const __m512 xh = _mm512_mul_ps(_mm512_sub_ps(load(row.x + j, m), row.mu), row.rs);
  const __m512 d = load(row.dy + j, m);
  const __m512 g = _mm512_mul_ps(d, loadf(row.w + j, m));
  vg = _mm512_add_ps(vg, g);
  vgx = _mm512_fmadd_ps(g, xh, vgx);
  if (dw) _mm512_mask_storeu_ps(dw + j, m, _mm512_fmadd_ps(d, xh, loadf(dw + j, m)));
  if (db) _mm512_mask_storeu_ps(db + j, m, _mm512_add_ps(d, loadf(db + j, m)));
}

template <class T>
ST_AVX512 inline void ln_back_write(const LnBackRow<T>& row, int64_t j, __mmask16 m, __m512 mg, __m512 mgx,
                                    T* dx) {
  const __m512 xh = _mm512_mul_ps(_mm512_sub_ps(load(row.x + j, m), row.mu), row.rs);
  const __m512 g = _mm512_mul_ps(load(row.dy + j, m), loadf(row.w + j, m));
  store(dx + j, _mm512_mul_ps(row.rs, _mm512_sub_ps(_mm512_sub_ps(g, mg), _mm512_mul_ps(xh, mgx))), m);
}

// dx = rstd * (g - mean(g) - xh * mean(g * xh)) with g = dy * w and xh = (x - mean) * rstd;
// dw += dy * xh and db += dy over the rows, when given.
template <class T>
ST_AVX512 void layer_norm_backward_rows(const T* dy, const T* x, const float* w, const float* mean,
                                        const float* rstd, T* dx, float* dw, float* db, int64_t r0,
                                        int64_t r1, RowShape s) {
  const float inv_n = 1.0f / static_cast<float>(s.n);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o = r * s.n;
    const LnBackRow<T> row{x + o, dy + o, w, _mm512_set1_ps(mean[r]), _mm512_set1_ps(rstd[r])};
    __m512 vg = _mm512_setzero_ps(), vgx = _mm512_setzero_ps();
    for (int64_t j = 0; j < s.full; j += 16) ln_back_accumulate(row, j, 0xFFFF, vg, vgx, dw, db);
    if (s.tail) ln_back_accumulate(row, s.full, s.tail, vg, vgx, dw, db);
    const __m512 mg = _mm512_set1_ps(_mm512_reduce_add_ps(vg) * inv_n);
    const __m512 mgx = _mm512_set1_ps(_mm512_reduce_add_ps(vgx) * inv_n);
    for (int64_t j = 0; j < s.full; j += 16) ln_back_write(row, j, 0xFFFF, mg, mgx, dx + o);
    if (s.tail) ln_back_write(row, s.full, s.tail, mg, mgx, dx + o);
  }
}

// --- Bias add -----------------------------------------------------------------------------

template <class T>
ST_AVX512 void add_bias_rows(T* y, const float* b, int64_t r0, int64_t r1, RowShape s) {
  for (int64_t r = r0; r < r1; ++r) {
    T* yr = y + r * s.n;
    for (int64_t j = 0; j < s.full; j += 16) store(yr + j, _mm512_add_ps(load(yr + j), _mm512_loadu_ps(b + j)));
    if (s.tail) store(yr + s.full, _mm512_add_ps(load(yr + s.full, s.tail), loadf(b + s.full, s.tail)), s.tail);
  }
}

// --- GELU (exact, erf form) -----------------------------------------------------------------

// erf(x) to a few fp32 ulps without exp: x P(x^2) / Q(x^2) on x clamped to [-4, 4] (erf is
// +-1 in fp32 beyond), the rational minimax fit Eigen and XLA use for fp32.
ST_AVX512 inline __m512 erf16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-4.0f), _mm512_min_ps(_mm512_set1_ps(4.0f), x));
  const __m512 x2 = _mm512_mul_ps(x, x);
  __m512 p = _mm512_fmadd_ps(x2, _mm512_set1_ps(-2.72614225801306e-10f), _mm512_set1_ps(2.77068142495902e-08f));
  p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(-2.10102402082508e-06f));
  p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(-5.69250639462346e-05f));
  p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(-7.34990630326855e-04f));
  p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(-2.95459980854025e-03f));
  p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(-1.60960333262415e-02f));
  p = _mm512_mul_ps(x, p);
  __m512 q = _mm512_fmadd_ps(x2, _mm512_set1_ps(-1.45660718464996e-05f), _mm512_set1_ps(-2.13374055278905e-04f));
  q = _mm512_fmadd_ps(x2, q, _mm512_set1_ps(-1.68282697438203e-03f));
  q = _mm512_fmadd_ps(x2, q, _mm512_set1_ps(-7.37332916720468e-03f));
  q = _mm512_fmadd_ps(x2, q, _mm512_set1_ps(-1.42647390514189e-02f));
  // p / q by a reciprocal estimate (2^-14) and one Newton step (~2^-28).
  __m512 r = _mm512_rcp14_ps(q);
  r = _mm512_mul_ps(r, _mm512_fnmadd_ps(q, r, _mm512_set1_ps(2.0f)));
  return _mm512_mul_ps(p, r);
}

// Phi(x) = (1 + erf(x / sqrt 2)) / 2, the standard normal CDF.
ST_AVX512 inline __m512 phi_cdf16(__m512 x) {
  const __m512 half = _mm512_set1_ps(0.5f);
  return _mm512_fmadd_ps(half, erf16(_mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f))), half);
}

template <class T>
ST_AVX512 void gelu_range(const T* x, T* y, int64_t i0, int64_t i1) {
  int64_t i = i0;
  for (; i + 16 <= i1; i += 16) {
    const __m512 v = load(x + i);
    store(y + i, _mm512_mul_ps(v, phi_cdf16(v)));
  }
  if (i < i1) {
    const __mmask16 m = static_cast<__mmask16>((1u << (i1 - i)) - 1);
    const __m512 v = load(x + i, m);
    store(y + i, _mm512_mul_ps(v, phi_cdf16(v)), m);
  }
}

// d gelu / dx = Phi(x) + x phi(x), phi(x) = exp(-x^2 / 2) / sqrt(2 pi).
ST_AVX512 inline __m512 gelu_grad16(__m512 v, __m512 d) {
  const __m512 pdf = _mm512_mul_ps(exp16(_mm512_mul_ps(_mm512_mul_ps(v, v), _mm512_set1_ps(-0.5f))),
                                   _mm512_set1_ps(0.39894228040143268f));
  return _mm512_mul_ps(d, _mm512_fmadd_ps(v, pdf, phi_cdf16(v)));
}

template <class T>
ST_AVX512 void gelu_backward_range(const T* dy, const T* x, T* dx, int64_t i0, int64_t i1) {
  int64_t i = i0;
  for (; i + 16 <= i1; i += 16) store(dx + i, gelu_grad16(load(x + i), load(dy + i)));
  if (i < i1) {
    const __mmask16 m = static_cast<__mmask16>((1u << (i1 - i)) - 1);
    store(dx + i, gelu_grad16(load(x + i, m), load(dy + i, m)), m);
  }
}

// --- Sum of two tensors ---------------------------------------------------------------------

template <class T>
ST_AVX512 void add_range(const T* a, const T* b, T* out, int64_t i0, int64_t i1) {
  int64_t i = i0;
  for (; i + 16 <= i1; i += 16) store(out + i, _mm512_add_ps(load(a + i), load(b + i)));
  if (i < i1) {
    const __mmask16 m = static_cast<__mmask16>((1u << (i1 - i)) - 1);
    store(out + i, _mm512_add_ps(load(a + i, m), load(b + i, m)), m);
  }
}

// --- Plain C++ around them ----------------------------------------------------------------

template <class T>
const T* data(const at::Tensor& t) { return static_cast<const T*>(t.data_ptr()); }
template <class T>
T* mutable_data(const at::Tensor& t) { return static_cast<T*>(t.data_ptr()); }

// Calls f with a value of the element type the kernels use for t: float, or uint16_t (bf16 bits).
template <class F>
void dispatch(const at::Tensor& t, F&& f) {
  if (t.scalar_type() == at::kFloat)
    f(float{});
  else
    f(uint16_t{});
}

int64_t width_of(const at::Tensor& t) { return t.dim() == 0 ? 1 : t.size(-1); }
int64_t rows_of(const at::Tensor& t) { return t.numel() == 0 ? 0 : t.numel() / width_of(t); }
// Elements per task: enough work to be worth a thread.
constexpr int64_t kGrainElements = 32768;
// Rows per task, for the row kernels.
int64_t grain(int64_t width) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(width, 1)); }

void check_input(const at::Tensor& t, const char* what) {
  TORCH_CHECK(eligible(t), "shardtune::kernels: ", what,
              " must be a contiguous bf16 or fp32 CPU tensor on a CPU with AVX-512 BF16, got ", t.scalar_type(),
              t.is_contiguous() ? "" : " (not contiguous)");
}

// Both inputs checked as above, and of one shape and dtype.
void check_same_shape(const at::Tensor& a, const char* a_what, const at::Tensor& b, const char* b_what) {
  check_input(a, a_what);
  check_input(b, b_what);
  TORCH_CHECK(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type(), "shardtune::kernels: ", b_what, " ",
              b.sizes(), " ", b.scalar_type(), " does not match ", a_what, " ", a.sizes(), " ", a.scalar_type());
}

// out = f(a, b) element by element, a fresh tensor, by a range kernel such as add_range<T>.
template <class T>
at::Tensor elementwise(const at::Tensor& a, const at::Tensor& b, void (*range)(const T*, const T*, T*, int64_t, int64_t)) {
  at::Tensor out = at::empty_like(a);
  at::parallel_for(0, a.numel(), kGrainElements,
                   [&](int64_t i0, int64_t i1) { range(data<T>(a), data<T>(b), mutable_data<T>(out), i0, i1); });
  return out;
}

at::Tensor fp32_vector(const at::Tensor& v, int64_t n, const char* what) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == n, "shardtune::kernels: ", what, " must be [", n, "], got ", v.sizes());
  return v.to(at::kFloat).contiguous();
}

}  // namespace

bool available() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return has;
}

bool eligible(const at::Tensor& t) {
  return available() && t.defined() && (t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kFloat) &&
         t.device().is_cpu() && t.is_contiguous() && t.dim() >= 1;
}

at::Tensor softmax_lastdim(const at::Tensor& x, double scale) {
  check_input(x, "softmax input");
  TORCH_CHECK(scale > 0, "shardtune::kernels: softmax scale must be positive, got ", scale);
  at::Tensor y = at::empty_like(x);
  const RowShape s(width_of(x));
  dispatch(x, [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, rows_of(x), grain(s.n), [&](int64_t r0, int64_t r1) {
      std::vector<float> buf(s.full + 16);
      softmax_rows<T>(data<T>(x), mutable_data<T>(y), buf.data(), static_cast<float>(scale), r0, r1, s);
    });
  });
  return y;
}

at::Tensor softmax_lastdim_backward(const at::Tensor& y, const at::Tensor& dy, double scale) {
  check_same_shape(y, "softmax output", dy, "softmax output gradient");
  at::Tensor dx = at::empty_like(y);
  const RowShape s(width_of(y));
  dispatch(y, [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, rows_of(y), grain(s.n), [&](int64_t r0, int64_t r1) {
      softmax_backward_rows<T>(data<T>(y), data<T>(dy), mutable_data<T>(dx), static_cast<float>(scale), r0, r1, s);
    });
  });
  return dx;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm(const at::Tensor& x, const at::Tensor& weight,
                                                          const at::Tensor& bias, double eps) {
  check_input(x, "LayerNorm input");
  const RowShape s(width_of(x));
  const at::Tensor w = fp32_vector(weight, s.n, "LayerNorm weight"), b = fp32_vector(bias, s.n, "LayerNorm bias");
  const int64_t rows = rows_of(x);
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({rows}, x.options().dtype(at::kFloat)), rstd = at::empty_like(mean);
  dispatch(x, [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, rows, grain(s.n), [&](int64_t r0, int64_t r1) {
      std::vector<float> buf(s.full + 16);
      layer_norm_rows<T>(data<T>(x), w.data_ptr<float>(), b.data_ptr<float>(), static_cast<float>(eps),
                         mutable_data<T>(y), mean.data_ptr<float>(), rstd.data_ptr<float>(), buf.data(), r0, r1, s);
    });
  });
  return {y, mean, rstd};
}

LayerNormGrads layer_norm_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                   const at::Tensor& mean, const at::Tensor& rstd, bool want_dweight,
                                   bool want_dbias) {
  check_same_shape(x, "LayerNorm input", dy, "LayerNorm output gradient");
  const RowShape s(width_of(x));
  const int64_t rows = rows_of(x);
  const at::Tensor w = fp32_vector(weight, s.n, "LayerNorm weight");
  TORCH_CHECK(mean.numel() == rows && rstd.numel() == rows && mean.scalar_type() == at::kFloat &&
                  rstd.scalar_type() == at::kFloat,
              "shardtune::kernels: LayerNorm statistics must be fp32 [", rows, "]");
  LayerNormGrads out;
  out.dx = at::empty_like(x);
  // One row of partial weight/bias gradients per thread, summed at the end.
  const int64_t threads = at::get_num_threads();
  at::Tensor partial_w = want_dweight ? at::zeros({threads, s.n}, w.options()) : at::Tensor();
  at::Tensor partial_b = want_dbias ? at::zeros({threads, s.n}, w.options()) : at::Tensor();
  dispatch(x, [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, rows, grain(s.n), [&](int64_t r0, int64_t r1) {
      const int64_t t = at::get_thread_num();
      float* dw = want_dweight ? partial_w.data_ptr<float>() + t * s.n : nullptr;
      float* db = want_dbias ? partial_b.data_ptr<float>() + t * s.n : nullptr;
      layer_norm_backward_rows<T>(data<T>(dy), data<T>(x), w.data_ptr<float>(), mean.data_ptr<float>(),
                                  rstd.data_ptr<float>(), mutable_data<T>(out.dx), dw, db, r0, r1, s);
    });
  });
  if (want_dweight) out.dweight = partial_w.sum(0);
  if (want_dbias) out.dbias = partial_b.sum(0);
  return out;
}

void add_bias_(const at::Tensor& y, const at::Tensor& bias) {
  check_input(y, "biased output");
  const RowShape s(width_of(y));
  const at::Tensor b = fp32_vector(bias, s.n, "bias");
  dispatch(y, [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, rows_of(y), grain(s.n), [&](int64_t r0, int64_t r1) {
      add_bias_rows<T>(mutable_data<T>(y), b.data_ptr<float>(), r0, r1, s);
    });
  });
}

at::Tensor gelu(const at::Tensor& x) {
  check_input(x, "GELU input");
  at::Tensor y = at::empty_like(x);
  dispatch(x, [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, x.numel(), kGrainElements,
                     [&](int64_t i0, int64_t i1) { gelu_range<T>(data<T>(x), mutable_data<T>(y), i0, i1); });
  });
  return y;
}

at::Tensor gelu_backward(const at::Tensor& dy, const at::Tensor& x) {
  check_same_shape(x, "GELU input", dy, "GELU output gradient");
  at::Tensor out;
  dispatch(x, [&](auto tag) { out = elementwise(dy, x, &gelu_backward_range<decltype(tag)>); });
  return out;
}

at::Tensor add(const at::Tensor& a, const at::Tensor& b) {
  check_same_shape(a, "summand", b, "summand");
  at::Tensor out;
  dispatch(a, [&](auto tag) { out = elementwise(a, b, &add_range<decltype(tag)>); });
  return out;
}

}  // namespace shardtune::kernels
