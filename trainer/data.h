// Data sets for training and evaluation, and the deterministic batch order.
//
// Batch order depends on the seed and the step alone: global batch s holds positions
// [s B, (s+1) B) of an endless stream of epochs, epoch e being a permutation drawn from
// (seed, e). Data-parallel rank r takes the r-th contiguous slice of it, so every mesh
// shape sees the same samples, and resuming at step s needs nothing but s.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <future>
#include <string>

#include "models/vit_config.h"

namespace shardtune {

struct DataConfig {
  std::string dataset = "fashion_mnist";  // fashion_mnist | synthetic
  std::string root = "/usr/share/datasets/fashion-mnist";
  std::string classes;          // "" all, "5-9", "0,2,4": picked and renumbered 0..k-1
  int64_t train_samples = 0;    // 0: every training image of the classes
  int64_t val_samples = 0;      // held out from the rest of the training file
  int64_t eval_samples = 0;     // 0: every test image of the classes
  int64_t batch_size = 64;      // global
  uint64_t seed = 0;            // sample selection and batch order
  double mean = 0.2860, std = 0.3530;  // Fashion-MNIST pixel statistics
};

// Raw images [N, H, W] uint8 (or [N, C, H, W] float for synthetic) and labels [N] int64.
struct Dataset {
  torch::Tensor images, labels;
  int64_t num_classes = 0;
  int64_t size() const { return labels.defined() ? labels.size(0) : 0; }
};

struct Splits {
  Dataset train, val, test;
};

// Loads the splits. Errors name the file or the key ("data.classes=7-3 ...").
Splits load_splits(const DataConfig& cfg, const ViTConfig& model);

// Model-ready images [n, C, S, S] float32 for `idx` of `ds`: /255, bilinear resize to S,
// grey repeated to C channels, (x - mean) / std.
torch::Tensor preprocess(const Dataset& ds, const torch::Tensor& idx, const ViTConfig& model, const DataConfig& cfg);

// Indices of this dp rank's share of global batch `step`.
torch::Tensor batch_indices(int64_t n, int64_t global_batch, uint64_t seed, int64_t step, int dp_rank, int dp);

struct Batch {
  torch::Tensor images, labels;
};

// Prepares the next batch on a background thread while the current one computes.
class Prefetcher {
 public:
  Prefetcher(const Dataset& ds, const ViTConfig& model, const DataConfig& cfg, int dp_rank, int dp);
  // The batch of `step`; starts preparing step + 1.
  Batch get(int64_t step);

 private:
  Batch make(int64_t step) const;
  const Dataset& ds_;
  ViTConfig model_;
  DataConfig cfg_;
  int dp_rank_, dp_;
  int64_t next_step_ = -1;
  std::future<Batch> next_;
};

}  // namespace shardtune
