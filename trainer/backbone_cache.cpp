#include "trainer/backbone_cache.h"

#include <cstdio>
#include <stdexcept>
#include <unordered_map>

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
    : slot_(new std::atomic<int64_t>[static_cast<size_t>(n)]) {
  for (int64_t i = 0; i < n; ++i) slot_[static_cast<size_t>(i)].store(-1);
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
    std::vector<int64_t> full{std::min(n, samples)};
    full.insert(full.end(), s.begin(), s.end());
    store_.push_back(torch::empty(full, torch::TensorOptions().dtype(dtype)));
  }
}

void BackboneCache::put(const torch::Tensor& idx, const std::vector<torch::Tensor>& outputs) {
  if (outputs.size() != store_.size())
    throw std::logic_error("backbone cache: " + std::to_string(outputs.size()) + " outputs, expected " +
                           std::to_string(store_.size()));
  torch::NoGradGuard no_grad;
  // Rows for the samples not cached yet (one writer: the training thread); published after the
  // data is written, so a reader that sees a row sees its data.
  const auto* id = idx.data_ptr<int64_t>();
  std::vector<int64_t> rows(static_cast<size_t>(idx.numel()));
  std::unordered_map<int64_t, int64_t> fresh;  // a sample twice in one batch (a batch across two epochs) takes one row
  for (int64_t j = 0; j < idx.numel(); ++j) {
    const int64_t have = slot_[static_cast<size_t>(id[j])].load(std::memory_order_relaxed);
    if (have >= 0) {
      rows[static_cast<size_t>(j)] = have;
      continue;
    }
    auto [it, added] = fresh.emplace(id[j], images_);
    if (added && images_++ == store_.front().size(0))
      throw std::logic_error("backbone cache: more samples than the " + std::to_string(store_.front().size(0)) +
                             " this rank can see");
    rows[static_cast<size_t>(j)] = it->second;
  }
  const torch::Tensor at = torch::tensor(rows, torch::kInt64);
  for (size_t k = 0; k < store_.size(); ++k) store_[k].index_copy_(0, at, outputs[k].detach().to(store_[k].scalar_type()));
  for (int64_t j = 0; j < idx.numel(); ++j) slot_[static_cast<size_t>(id[j])].store(rows[static_cast<size_t>(j)], std::memory_order_release);
}

std::vector<torch::Tensor> BackboneCache::get(const torch::Tensor& idx) const {
  std::vector<int64_t> rows;
  const auto* id = idx.data_ptr<int64_t>();
  for (int64_t j = 0; j < idx.numel(); ++j) {
    const int64_t row = slot_[static_cast<size_t>(id[j])].load(std::memory_order_acquire);
    if (row < 0) throw std::logic_error("backbone cache: sample " + std::to_string(id[j]) + " is not cached");
    rows.push_back(row);
  }
  const torch::Tensor at = torch::tensor(rows, torch::kInt64);
  std::vector<torch::Tensor> out;
  for (const auto& s : store_) out.push_back(s.index_select(0, at));
  return out;
}

}  // namespace shardtune
