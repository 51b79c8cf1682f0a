// Data sets for training and evaluation, and the deterministic batch order.
//
// Batch order depends on the seed and the step alone: global batch s holds positions
// [s B, (s+1) B) of an endless stream of epochs, epoch e being a permutation drawn from
// (seed, e). Data-parallel rank r takes the r-th contiguous slice of it, so every mesh
// shape sees the same samples, and resuming at step s needs nothing but s.
#pragma once

#include <torch/torch.h>

#include <atomic>
#include <condition_variable>
#include <functional>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "models/vit_config.h"

namespace shardtune {

struct DataConfig {
  std::string dataset = "fashion_mnist";  // fashion_mnist | synthetic | imagefolder | filelist
  std::string root = "/usr/share/datasets/fashion-mnist";
  std::string train_list, val_list, test_list;  // filelist: "relative/path label" lines
  std::string transform = "vtab";        // vtab | timm_eval | timm_train (image files)
  std::string interpolation = "bilinear";  // bilinear | bicubic
  double crop_pct = 0.875;               // timm_eval
  std::string bad_images = "error";      // error | skip (a bad file replaced by the next good one of its class)
  int workers = 0;                       // decode threads; 0: the cores left after the compute threads, >= 1
  int prefetch = 2;                      // ready batches queued ahead
  std::string classes;          // "" all, "5-9", "0,2,4": picked and renumbered 0..k-1
  int64_t train_samples = 0;    // 0: every training image of the classes
  int64_t val_samples = 0;      // held out from the rest of the training file
  int64_t eval_samples = 0;     // 0: every test image of the classes
  int64_t batch_size = 64;      // global
  uint64_t seed = 0;            // sample selection and batch order
  // Per channel, or one for all; empty: ImageNet's for 3 channels, Fashion-MNIST's for 1.
  std::vector<double> mean, std;
};

// data.mean or data.std for `channels`: one value repeated, or one a channel; unset,
// Fashion-MNIST's for that data set and for grey models, ImageNet's otherwise.
std::vector<double> channel_stats(const DataConfig& cfg, bool mean, int64_t channels);

// Distinct files skipped under data.bad_images=skip, shared by the copies of a data set.
struct SkipLog {
  std::mutex m;
  std::set<std::string> files;
  size_t count() {
    std::lock_guard<std::mutex> l(m);
    return files.size();
  }
};

// Raw images [N, H, W] uint8 (or [N, C, H, W] float for synthetic), or for image files
// their paths (read as needed), and labels [N] int64.
struct Dataset {
  torch::Tensor images, labels;
  int64_t num_classes = 0;
  std::vector<std::string> files;         // imagefolder / filelist: one path a sample
  std::vector<std::string> class_names;   // index -> name
  std::shared_ptr<SkipLog> skipped = std::make_shared<SkipLog>();
  bool file_backed() const { return !files.empty(); }
  int64_t size() const { return labels.defined() ? labels.size(0) : 0; }
};

struct Splits {
  Dataset train, val, test;
};

// Loads the splits. Errors name the file or the key ("data.classes=7-3 ...").
Splits load_splits(const DataConfig& cfg, const ViTConfig& model);

// One line for the log: "imagefolder /data/x: 10 classes, 800 train / 200 val / 5000 test images".
std::string describe(const Splits& s, const DataConfig& cfg);

// Model-ready images [n, C, S, S] float32 for `idx` of `ds`: /255, bilinear resize to S,
// grey repeated to C channels, (x - mean) / std. Image files: decoded and put through the
// eval transform (timm_train evaluates with timm_eval), on data.workers threads.
torch::Tensor preprocess(const Dataset& ds, const torch::Tensor& idx, const ViTConfig& model, const DataConfig& cfg);

// One training sample of an image file: decoded, data.transform with the augmentation of
// (data.seed, epoch, index); a bad file per data.bad_images. [C, S, S].
torch::Tensor load_sample(const Dataset& ds, int64_t index, int64_t epoch, const ViTConfig& model, const DataConfig& cfg,
                          bool train);

// classes.json: a JSON array, element i the name of class i (written atomically); reading a
// missing file gives {}.
void write_class_names(const std::string& path, const std::vector<std::string>& names);
std::vector<std::string> read_class_names(const std::string& path);

// The decode threads of data.workers = 0 on this process.
int default_workers();

// Indices of this dp rank's share of global batch `step`; `epochs`, if given, gets each one's epoch.
torch::Tensor batch_indices(int64_t n, int64_t global_batch, uint64_t seed, int64_t step, int dp_rank, int dp,
                            std::vector<int64_t>* epochs = nullptr);

struct Batch {
  torch::Tensor images, labels;
  torch::Tensor indices;  // the samples, int64 [n]
};

// The training batches of this dp rank, in step order, made ahead by data.workers threads
// into a queue of data.prefetch batches (per image for image files, per batch otherwise).
// `decode` false (a pipeline stage after the first): labels only. Asking for a step out of
// order restarts the queue there.
class Prefetcher {
 public:
  Prefetcher(const Dataset& ds, const ViTConfig& model, const DataConfig& cfg, int dp_rank, int dp, bool decode = true);
  ~Prefetcher();
  Prefetcher(const Prefetcher&) = delete;
  Prefetcher& operator=(const Prefetcher&) = delete;
  Batch get(int64_t step);
  // Samples for which `skip(index)` holds (checked on the decode threads when a batch is made)
  // are not decoded: their rows of Batch::images are left unwritten (train.cache_backbone).
  // Set before the first get().
  void skip_when(std::function<bool(int64_t)> skip) { skip_ = std::move(skip); }
  double wait_seconds() const { return wait_s_; }  // spent in get() waiting for a batch
  int workers() const { return workers_; }

 private:
  struct Pending {
    torch::Tensor images, labels, idx;
    std::vector<int64_t> epochs;
    int64_t done = 0;
    std::exception_ptr error;
  };
  void start(int64_t step);
  void stop();
  void work();
  std::shared_ptr<Pending> pending(int64_t step);  // under m_

  const Dataset& ds_;
  ViTConfig model_;
  DataConfig cfg_;
  int dp_rank_, dp_;
  bool decode_;
  int workers_;
  int64_t units_;          // jobs a batch: its images (files) or 1 (tensors)
  std::mutex m_;
  std::condition_variable work_cv_, ready_cv_;
  std::map<int64_t, std::shared_ptr<Pending>> queue_;
  int64_t first_ = -1, next_job_ = 0, consumer_ = 0;
  bool stopping_ = false;
  std::vector<std::thread> threads_;
  double wait_s_ = 0;
  std::function<bool(int64_t)> skip_;
};

}  // namespace shardtune
