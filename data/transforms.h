// The image transforms of data.transform, on one decoded image: vtab (a plain resize to the
// model's size: the protocol of the PEFT papers), timm_eval (short side to size / crop_pct,
// centre crop) and timm_train (RandomResizedCrop + horizontal flip). Resizing is
// torchvision's antialias=True (the same kernels; antialiased when shrinking, as PIL does);
// enlarging bilinearly takes the plain kernel of the IDX path, equal up to rounding, so a
// lossless PNG of a Fashion-MNIST image gives its exact tensor.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <vector>

#include "data/decode.h"

namespace shardtune::data {

struct TransformSpec {
  std::string kind = "vtab";            // vtab | timm_eval | timm_train
  std::string interpolation = "bilinear";  // bilinear | bicubic
  double crop_pct = 0.875;              // timm_eval
  int64_t image_size = 224;
  std::vector<double> mean, std;        // one per output channel
};

// Throws std::invalid_argument naming the data.* key of a bad value.
void check_transform(const TransformSpec& t);

struct Box {
  int64_t top = 0, left = 0, height = 0, width = 0;
};

// A counter-based generator: draw k of sample `index` at `epoch` depends on nothing else,
// so every mesh, thread count and resumed run augments a sample alike.
uint64_t sample_seed(uint64_t seed, int64_t epoch, int64_t index);

// torchvision's RandomResizedCrop.get_params (scale 0.08-1, ratio 3/4-4/3, 10 tries, then the
// centre crop of the clamped ratio) drawing from `seed`; `*flip` the horizontal flip (p = 0.5).
Box random_resized_crop(int64_t height, int64_t width, uint64_t seed, bool* flip);

// [C, H, W] float in [0, 1] to [C, oh, ow].
torch::Tensor resize(const torch::Tensor& chw, int64_t oh, int64_t ow, const std::string& interpolation);

// The model-ready [C, S, S] float32 image: /255, the transform, (x - mean) / std per channel.
// `seed` (sample_seed) drives timm_train's augmentation; the other transforms ignore it.
torch::Tensor apply_transform(const Image& img, const TransformSpec& t, uint64_t seed);

}  // namespace shardtune::data
