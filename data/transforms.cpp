#include "data/transforms.h"

#include <cmath>
#include <stdexcept>

namespace shardtune::data {

void check_transform(const TransformSpec& t) {
  if (t.kind != "vtab" && t.kind != "timm_eval" && t.kind != "timm_train")
    throw std::invalid_argument("data.transform=" + t.kind + " is not one of vtab, timm_eval, timm_train");
  if (t.interpolation != "bilinear" && t.interpolation != "bicubic")
    throw std::invalid_argument("data.interpolation=" + t.interpolation + " is not one of bilinear, bicubic");
  if (!(t.crop_pct > 0 && t.crop_pct <= 1))
    throw std::invalid_argument("data.crop_pct=" + std::to_string(t.crop_pct) + " must be in (0, 1]");
  for (double s : t.std)
    if (!(s > 0)) throw std::invalid_argument("data.std=" + std::to_string(s) + " must be positive");
}

namespace {

uint64_t splitmix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

struct Rng {
  uint64_t state;
  uint64_t next() { return splitmix(state++); }
  double uniform(double a, double b) { return a + (b - a) * static_cast<double>(next() >> 11) * 0x1.0p-53; }
  int64_t below(int64_t n) { return static_cast<int64_t>(next() % static_cast<uint64_t>(n)); }  // n small: bias ~1e-16
};

int64_t round_half_even(double x) { return static_cast<int64_t>(std::nearbyint(x)); }  // Python's round()

}  // namespace

uint64_t sample_seed(uint64_t seed, int64_t epoch, int64_t index) {
  return splitmix(splitmix(splitmix(seed) ^ static_cast<uint64_t>(epoch)) ^ static_cast<uint64_t>(index));
}

Box random_resized_crop(int64_t height, int64_t width, uint64_t seed, bool* flip) {
  Rng rng{seed};
  const double area = static_cast<double>(height * width);
  const double lo = std::log(3.0 / 4.0), hi = std::log(4.0 / 3.0);
  Box b;
  bool found = false;
  for (int attempt = 0; attempt < 10 && !found; ++attempt) {
    const double target = area * rng.uniform(0.08, 1.0);
    const double aspect = std::exp(rng.uniform(lo, hi));
    const int64_t w = round_half_even(std::sqrt(target * aspect)), h = round_half_even(std::sqrt(target / aspect));
    if (0 < w && w <= width && 0 < h && h <= height) {
      b = {rng.below(height - h + 1), rng.below(width - w + 1), h, w};
      found = true;
    }
  }
  if (!found) {
    const double in_ratio = static_cast<double>(width) / static_cast<double>(height);
    int64_t w = width, h = height;
    if (in_ratio < 3.0 / 4.0) h = round_half_even(static_cast<double>(w) / (3.0 / 4.0));
    else if (in_ratio > 4.0 / 3.0) w = round_half_even(static_cast<double>(h) * (4.0 / 3.0));
    b = {(height - h) / 2, (width - w) / 2, h, w};
  }
  *flip = (rng.next() >> 63) != 0;
  return b;
}

torch::Tensor resize(const torch::Tensor& chw, int64_t oh, int64_t ow, const std::string& interpolation) {
  const int64_t h = chw.size(1), w = chw.size(2);
  if (oh == h && ow == w) return chw;
  const bool bicubic = interpolation == "bicubic";
  torch::Tensor x = chw.unsqueeze(0);
  // Enlarging bilinearly, antialiasing changes nothing: the plain kernel, the IDX path's. Cubic
  // filters differ (torchvision's antialias=True and PIL use a = -0.5, interpolate a = -0.75),
  // so bicubic always takes the antialiased kernel.
  if (!bicubic && oh >= h && ow >= w) {
    namespace F = torch::nn::functional;
    auto opts = F::InterpolateFuncOptions().size(std::vector<int64_t>{oh, ow}).align_corners(false);
    if (bicubic) opts.mode(torch::kBicubic);
    else opts.mode(torch::kBilinear);
    x = F::interpolate(x, opts);
  } else {
    x = bicubic ? at::_upsample_bicubic2d_aa(x, {oh, ow}, false) : at::_upsample_bilinear2d_aa(x, {oh, ow}, false);
  }
  if (bicubic) x = x.clamp_(0.0, 1.0);  // cubic overshoot: PIL and uint8 pipelines clip it
  return x.squeeze(0);
}

torch::Tensor apply_transform(const Image& img, const TransformSpec& t, uint64_t seed) {
  torch::Tensor x = torch::from_blob(const_cast<uint8_t*>(img.pixels.data()), {img.height, img.width, img.channels}, torch::kUInt8)
                        .permute({2, 0, 1})
                        .to(torch::kFloat32)
                        .contiguous()
                        .div_(255.0);
  const int64_t s = t.image_size, h = img.height, w = img.width;
  if (t.kind == "vtab") {
    x = resize(x, s, s, t.interpolation);
  } else if (t.kind == "timm_eval") {
    const auto size = static_cast<int64_t>(std::floor(static_cast<double>(s) / t.crop_pct));
    // torchvision's Resize(int): the short side to `size`, the long side int(size * long / short).
    const int64_t oh = w <= h ? static_cast<int64_t>(static_cast<double>(size * h) / static_cast<double>(w)) : size;
    const int64_t ow = w <= h ? size : static_cast<int64_t>(static_cast<double>(size * w) / static_cast<double>(h));
    x = resize(x, oh, ow, t.interpolation);
    const int64_t top = round_half_even(static_cast<double>(oh - s) / 2.0), left = round_half_even(static_cast<double>(ow - s) / 2.0);
    x = x.slice(1, top, top + s).slice(2, left, left + s);
  } else {  // timm_train
    bool flip = false;
    const Box b = random_resized_crop(h, w, seed, &flip);
    x = resize(x.slice(1, b.top, b.top + b.height).slice(2, b.left, b.left + b.width).contiguous(), s, s, t.interpolation);
    if (flip) x = x.flip({2});
  }
  x = x.contiguous();
  for (int64_t c = 0; c < x.size(0); ++c) x[c].sub_(t.mean[static_cast<size_t>(c)]).div_(t.std[static_cast<size_t>(c)]);
  return x;
}

}  // namespace shardtune::data
