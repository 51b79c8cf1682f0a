#include "trainer/backbone_cache.h"

#include <cstdio>
#include <stdexcept>

namespace shardtune {

namespace {
std::string size(double bytes) {
  char buf[32];
  if (bytes >= 1e9) {
    std::snprintf(buf, sizeof(buf), "%.3g GB", bytes / 1e9);
  } else {
    std::snprintf(buf, sizeof(buf), "%.3g MB", bytes / 1e6);
  }
  return buf;
}
}  // namespace

BackboneCache::BackboneCache(int64_t n, const std::vector<std::vector<int64_t>>& shapes, torch::ScalarType dtype,
                             double max_gb, int64_t samples)
    : filled_(new std::atomic<uint8_t>[static_cast<size_t>(n)]) {
  for (int64_t i = 0; i < n; ++i) filled_[static_cast<size_t>(i)].store(0);
  for (const auto& s : shapes) {
    int64_t elems = 1;
    for (int64_t d : s) elems *= d;
    bytes_per_image_ += static_cast<double>(elems) * static_cast<double>(c10::elementSize(dtype));
  }
  const double needed = bytes_per_image_ * static_cast<double>(std::min(n, samples));
  if (needed > max_gb * 1e9) {
    char limit[32];
    std::snprintf(limit, sizeof(limit), "%g", max_gb);
    throw std::invalid_argument("train.cache_backbone: the cache needs " + size(needed) + " per rank (" +
                                std::to_string(std::min(n, samples)) + " images x " + size(bytes_per_image_) +
                                "), more than train.cache_max_gb=" + limit +
                                "; raise train.cache_max_gb or set train.cache_backbone=false");
  }
  // Untouched pages of an empty tensor are never resident: memory grows with the samples seen.
  for (const auto& s : shapes) {
    std::vector<int64_t> full{n};
    full.insert(full.end(), s.begin(), s.end());
    store_.push_back(torch::empty(full, torch::TensorOptions().dtype(dtype)));
  }
}

void BackboneCache::put(const torch::Tensor& idx, const std::vector<torch::Tensor>& outputs) {
  if (outputs.size() != store_.size())
    throw std::logic_error("backbone cache: " + std::to_string(outputs.size()) + " outputs, expected " +
                           std::to_string(store_.size()));
  torch::NoGradGuard no_grad;
  for (size_t k = 0; k < store_.size(); ++k) store_[k].index_copy_(0, idx, outputs[k].detach().to(store_[k].scalar_type()));
  const auto* id = idx.data_ptr<int64_t>();
  for (int64_t j = 0; j < idx.numel(); ++j) {
    if (filled_[static_cast<size_t>(id[j])].exchange(1, std::memory_order_release) == 0) ++images_;
  }
}

std::vector<torch::Tensor> BackboneCache::get(const torch::Tensor& idx) const {
  std::vector<torch::Tensor> out;
  for (const auto& s : store_) out.push_back(s.index_select(0, idx));
  return out;
}

}  // namespace shardtune
