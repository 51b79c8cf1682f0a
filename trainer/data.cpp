#include "trainer/data.h"

#include <algorithm>
#include <stdexcept>

#include "io/idx.h"
#include "peft/peft_config.h"

namespace shardtune {

namespace {

// "5-9" or "0,2,4" -> sorted class ids; "" -> 0..9.
std::vector<int64_t> parse_classes(const std::string& spec, int64_t total) {
  std::vector<int64_t> out;
  if (spec.empty()) {
    for (int64_t c = 0; c < total; ++c) out.push_back(c);
    return out;
  }
  for (const auto& item : split_list(spec)) {
    try {
      auto dash = item.find('-');
      int64_t a = std::stoll(item.substr(0, dash)), b = dash == std::string::npos ? a : std::stoll(item.substr(dash + 1));
      if (a > b || a < 0 || b >= total) throw std::out_of_range("range");
      for (int64_t c = a; c <= b; ++c) out.push_back(c);
    } catch (const std::exception&) {
      throw std::invalid_argument("data.classes=" + spec + ": '" + item + "' is not a class or range within 0-" +
                                  std::to_string(total - 1));
    }
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

Dataset read_idx_pair(const std::string& images_path, const std::string& labels_path) {
  auto img = io::read_idx_u8(images_path);
  auto lab = io::read_idx_u8(labels_path);
  if (img.dims.size() != 3) throw std::runtime_error(images_path + ": expected [N, H, W] images");
  if (lab.dims.size() != 1 || lab.dims[0] != img.dims[0])
    throw std::runtime_error(labels_path + ": " + std::to_string(lab.dims.empty() ? 0 : lab.dims[0]) +
                             " labels for " + std::to_string(img.dims[0]) + " images");
  Dataset d;
  d.images = torch::from_blob(img.data.data(), img.dims, torch::kUInt8).clone();
  d.labels = torch::from_blob(lab.data.data(), {lab.dims[0]}, torch::kUInt8).to(torch::kInt64);
  return d;
}

// Keeps the samples of `classes`, renumbered by their position in it.
Dataset select_classes(const Dataset& d, const std::vector<int64_t>& classes) {
  torch::Tensor map = torch::full({256}, -1, torch::kInt64);
  for (size_t i = 0; i < classes.size(); ++i) map[classes[i]] = static_cast<int64_t>(i);
  torch::Tensor renum = map.index_select(0, d.labels);
  torch::Tensor keep = (renum >= 0).nonzero().squeeze(1);
  return {d.images.index_select(0, keep), renum.index_select(0, keep), static_cast<int64_t>(classes.size())};
}

Dataset take(const Dataset& d, const torch::Tensor& idx) {
  return {d.images.index_select(0, idx), d.labels.index_select(0, idx), d.num_classes};
}

torch::Generator seeded(uint64_t seed) {
  auto g = at::detail::createCPUGenerator(seed);
  return g;
}

}  // namespace

Splits load_splits(const DataConfig& cfg, const ViTConfig& model) {
  if (cfg.batch_size <= 0) throw std::invalid_argument("data.batch_size=" + std::to_string(cfg.batch_size) + " must be positive");
  if (cfg.std <= 0) throw std::invalid_argument("data.std=" + std::to_string(cfg.std) + " must be positive");
  Splits s;
  if (cfg.dataset == "synthetic") {
    // Random images whose label is recoverable from them (the sign pattern of patch means),
    // so a model can learn; seeded, model-shaped.
    const int64_t n = cfg.train_samples > 0 ? cfg.train_samples : 512;
    const int64_t k = model.num_classes > 0 ? model.num_classes : 10;
    auto g = seeded(cfg.seed);
    auto make = [&](int64_t count) {
      Dataset d;
      d.labels = torch::randint(0, k, {count}, g, torch::kInt64);
      torch::Tensor proto = torch::randn({k, model.in_chans, model.image_size, model.image_size}, seeded(cfg.seed + 7));
      d.images = proto.index_select(0, d.labels) +
                 torch::randn({count, model.in_chans, model.image_size, model.image_size}, g);
      d.num_classes = k;
      return d;
    };
    s.train = make(n);
    s.val = make(std::max<int64_t>(0, cfg.val_samples));
    s.test = make(cfg.eval_samples > 0 ? cfg.eval_samples : 256);
    return s;
  }
  if (cfg.dataset != "fashion_mnist")
    throw std::invalid_argument("data.dataset=" + cfg.dataset + " is not one of fashion_mnist, synthetic");

  const auto classes = parse_classes(cfg.classes, 10);
  Dataset train = select_classes(read_idx_pair(cfg.root + "/train-images-idx3-ubyte.gz", cfg.root + "/train-labels-idx1-ubyte.gz"), classes);
  Dataset test = select_classes(read_idx_pair(cfg.root + "/t10k-images-idx3-ubyte.gz", cfg.root + "/t10k-labels-idx1-ubyte.gz"), classes);
  if (model.num_classes != static_cast<int64_t>(classes.size()))
    throw std::invalid_argument("model.num_classes=" + std::to_string(model.num_classes) + " but data.classes=" +
                                (cfg.classes.empty() ? std::string("(all)") : cfg.classes) + " has " +
                                std::to_string(classes.size()) + " classes");

  // VTAB-1k-style few-shot split: a seeded permutation of the training file's samples.
  const int64_t n = train.size();
  const int64_t n_train = cfg.train_samples > 0 ? cfg.train_samples : n - cfg.val_samples;
  if (cfg.train_samples < 0 || cfg.val_samples < 0 || n_train + cfg.val_samples > n || n_train <= 0)
    throw std::invalid_argument("data.train_samples=" + std::to_string(cfg.train_samples) + " + data.val_samples=" +
                                std::to_string(cfg.val_samples) + " exceed the " + std::to_string(n) +
                                " training images of the chosen classes");
  torch::Tensor perm = torch::randperm(n, seeded(cfg.seed), torch::kInt64);
  s.train = take(train, perm.slice(0, 0, n_train));
  s.val = take(train, perm.slice(0, n_train, n_train + cfg.val_samples));
  s.test = cfg.eval_samples > 0 ? take(test, torch::arange(std::min(cfg.eval_samples, test.size()))) : test;
  return s;
}

torch::Tensor preprocess(const Dataset& ds, const torch::Tensor& idx, const ViTConfig& model, const DataConfig& cfg) {
  torch::Tensor x = ds.images.index_select(0, idx);
  if (x.scalar_type() != torch::kUInt8) return x.to(torch::kFloat32);  // synthetic: already model-ready
  x = x.unsqueeze(1).to(torch::kFloat32).div_(255.0);                  // [n, 1, H, W]
  if (x.size(2) != model.image_size || x.size(3) != model.image_size)
    x = torch::nn::functional::interpolate(x, torch::nn::functional::InterpolateFuncOptions()
                                                  .size(std::vector<int64_t>{model.image_size, model.image_size})
                                                  .mode(torch::kBilinear)
                                                  .align_corners(false));
  x = x.sub_(cfg.mean).div_(cfg.std);
  return model.in_chans == 1 ? x : x.expand({x.size(0), model.in_chans, x.size(2), x.size(3)}).contiguous();
}

torch::Tensor batch_indices(int64_t n, int64_t global_batch, uint64_t seed, int64_t step, int dp_rank, int dp) {
  const int64_t local = global_batch / dp;
  std::vector<int64_t> out;
  out.reserve(static_cast<size_t>(local));
  int64_t pos = step * global_batch + dp_rank * local;
  torch::Tensor perm;
  int64_t perm_epoch = -1;
  for (int64_t i = 0; i < local; ++i, ++pos) {
    const int64_t epoch = pos / n;
    if (epoch != perm_epoch) {
      perm = torch::randperm(n, seeded(seed * 1000003ull + static_cast<uint64_t>(epoch) + 1), torch::kInt64);
      perm_epoch = epoch;
    }
    out.push_back(perm[pos % n].item<int64_t>());
  }
  return torch::tensor(out, torch::kInt64);
}

Prefetcher::Prefetcher(const Dataset& ds, const ViTConfig& model, const DataConfig& cfg, int dp_rank, int dp)
    : ds_(ds), model_(model), cfg_(cfg), dp_rank_(dp_rank), dp_(dp) {}

Batch Prefetcher::make(int64_t step) const {
  torch::Tensor idx = batch_indices(ds_.size(), cfg_.batch_size, cfg_.seed, step, dp_rank_, dp_);
  return {preprocess(ds_, idx, model_, cfg_), ds_.labels.index_select(0, idx)};
}

Batch Prefetcher::get(int64_t step) {
  Batch b = (next_step_ == step && next_.valid()) ? next_.get() : make(step);
  next_step_ = step + 1;
  next_ = std::async(std::launch::async, [this, s = next_step_] { return make(s); });
  return b;
}

}  // namespace shardtune
