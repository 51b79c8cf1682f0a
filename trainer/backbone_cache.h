// train.cache_backbone: each training image's frozen-backbone outputs (what the trainable part
// of the model reads: VisionTransformerImpl::frozen_outputs), kept from the image's first use,
// so that later epochs skip the backbone and the loader skips decoding the image.
//
// Valid only when an image always gives the same outputs: a deterministic data.transform and a
// method with nothing trainable inside the cached part (linear, lst); the trainer checks both.
// Keyed by sample index; each data-parallel rank caches the samples it sees. Kept in the
// compute dtype: at fp32 the cached run is bit-identical to the uncached one when the backbone
// runs on the same batch shapes in both (one process, one micro-batch, epochs of whole
// batches: tested); otherwise, where a batch mixes cached and new samples, the backbone runs
// on a sub-batch and a GEMM of another shape may round differently (fp32 rounding, no more).
// Not part of a checkpoint: a resumed run starts with an empty cache and fills it again (bit
// for bit the uninterrupted run when it resumes at an epoch's end; inside an epoch, later
// batches mix cached and new samples: fp32 rounding, 3.7e-8 relative in the test).
#pragma once

#include <torch/torch.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace shardtune {

class BackboneCache {
 public:
  // `shapes`: one per output, without the batch dim; `n`: samples in the training set;
  // `samples`: how many distinct samples this rank can see (at most n). Throws
  // std::invalid_argument naming train.cache_max_gb and the size needed when it does not fit.
  BackboneCache(int64_t n, const std::vector<std::vector<int64_t>>& shapes, torch::ScalarType dtype, double max_gb,
                int64_t samples);

  // Whether sample `index` is cached (any thread).
  bool has(int64_t index) const { return slot_[static_cast<size_t>(index)].load(std::memory_order_acquire) >= 0; }
  // Keeps row j of every output for sample idx[j].
  void put(const torch::Tensor& idx, const std::vector<torch::Tensor>& outputs);
  // The outputs of samples `idx`, each [idx.size(0), ...].
  std::vector<torch::Tensor> get(const torch::Tensor& idx) const;

  int64_t images() const { return images_; }
  double bytes_per_image() const { return bytes_per_image_; }
  double bytes() const { return bytes_per_image_ * static_cast<double>(images_); }

 private:
  // [capacity, ...] each, capacity = the samples this rank can see; a sample takes the next
  // row when first seen (so the memory is what the bound says, whatever the set's size).
  std::vector<torch::Tensor> store_;
  std::unique_ptr<std::atomic<int64_t>[]> slot_;  // per sample: its row, or -1
  int64_t images_ = 0;
  double bytes_per_image_ = 0;
};

}  // namespace shardtune
