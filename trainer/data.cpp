#include "trainer/data.h"

#include <omp.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <stdexcept>

#include "data/decode.h"
#include "data/imagefolder.h"
#include "data/transforms.h"
#include "io/strict_json.h"

#include <filesystem>
#include <fstream>

#include "io/atomic_file.h"
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
  Dataset out = d;
  out.labels = d.labels.index_select(0, idx);
  if (d.file_backed()) {
    out.files.clear();
    auto acc = idx.accessor<int64_t, 1>();
    for (int64_t i = 0; i < idx.size(0); ++i) out.files.push_back(d.files[static_cast<size_t>(acc[i])]);
  } else {
    out.images = d.images.index_select(0, idx);
  }
  return out;
}

Dataset from_index(const data::FileIndex& f, int64_t num_classes, const std::vector<std::string>& names) {
  Dataset d;
  d.files = f.paths;
  d.labels = torch::tensor(f.labels, torch::kInt64);
  d.num_classes = num_classes;
  d.class_names = names;
  return d;
}

// Keeps the samples of `classes` (data.classes over the class folders), renumbered.
Dataset select_file_classes(const Dataset& d, const std::vector<int64_t>& classes) {
  torch::Tensor map = torch::full({std::max<int64_t>(d.num_classes, 1)}, -1, torch::kInt64);
  std::vector<std::string> names;
  for (size_t i = 0; i < classes.size(); ++i) {
    map[classes[i]] = static_cast<int64_t>(i);
    names.push_back(d.class_names.empty() ? std::to_string(classes[i]) : d.class_names[static_cast<size_t>(classes[i])]);
  }
  torch::Tensor renum = map.index_select(0, d.labels);
  torch::Tensor keep = (renum >= 0).nonzero().squeeze(1);
  Dataset out = take(d, keep);
  out.labels = renum.index_select(0, keep);
  out.num_classes = static_cast<int64_t>(classes.size());
  out.class_names = names;
  return out;
}

data::TransformSpec transform_spec(const DataConfig& cfg, const ViTConfig& model, bool train) {
  data::TransformSpec t;
  t.kind = (!train && cfg.transform == "timm_train") ? "timm_eval" : cfg.transform;
  t.interpolation = cfg.interpolation;
  t.crop_pct = cfg.crop_pct;
  t.image_size = model.image_size;
  t.mean = channel_stats(cfg, true, model.in_chans);
  t.std = channel_stats(cfg, false, model.in_chans);
  return t;
}

torch::Generator seeded(uint64_t seed) {
  auto g = at::detail::createCPUGenerator(seed);
  return g;
}

}  // namespace

std::vector<double> channel_stats(const DataConfig& cfg, bool mean, int64_t channels) {
  const std::vector<double>& given = mean ? cfg.mean : cfg.std;
  std::vector<double> out;
  if (given.empty()) {
    if (cfg.dataset == "fashion_mnist" || channels == 1) out.assign(static_cast<size_t>(channels), mean ? 0.2860 : 0.3530);
    else out = mean ? std::vector<double>{0.485, 0.456, 0.406} : std::vector<double>{0.229, 0.224, 0.225};
  } else if (given.size() == 1) {
    out.assign(static_cast<size_t>(channels), given[0]);
  } else {
    out = given;
  }
  if (static_cast<int64_t>(out.size()) != channels)
    throw std::invalid_argument(std::string(mean ? "data.mean" : "data.std") + " has " + std::to_string(given.size()) +
                                " values for model.in_chans=" + std::to_string(channels) + " (give 1 or " +
                                std::to_string(channels) + ")");
  if (!mean)
    for (double v : out)
      if (!(v > 0)) throw std::invalid_argument("data.std=" + std::to_string(v) + " must be positive");
  return out;
}

void write_class_names(const std::string& path, const std::vector<std::string>& names) {
  io::write_text_atomically(path, json::dump(json::Json(names), 1) + "\n");
}

std::vector<std::string> read_class_names(const std::string& path) {
  if (!std::filesystem::exists(path)) return {};
  const json::Json v = json::read_file(path);  // malformed JSON: an error naming the file
  try {
    return v.get<std::vector<std::string>>();
  } catch (const std::exception& e) {
    throw std::runtime_error(path + ": not a JSON array of class names: " + e.what());
  }
}

int default_workers() {
  const int cores = static_cast<int>(std::thread::hardware_concurrency());
  return std::max(1, cores - at::get_num_threads());
}

namespace {

// data.train_samples / val_samples / eval_samples over the splits of an image-file data set.
Splits finish_file_splits(const DataConfig& cfg, Dataset train, Dataset val, bool has_val, Dataset test) {
  Splits s;
  const int64_t n = train.size();
  if (!has_val) {  // held out of train, as for Fashion-MNIST
    const int64_t n_train = cfg.train_samples > 0 ? cfg.train_samples : n - cfg.val_samples;
    if (cfg.train_samples < 0 || cfg.val_samples < 0 || n_train + cfg.val_samples > n || n_train <= 0)
      throw std::invalid_argument("data.train_samples=" + std::to_string(cfg.train_samples) + " + data.val_samples=" +
                                  std::to_string(cfg.val_samples) + " exceed the " + std::to_string(n) + " training images");
    torch::Tensor perm = torch::randperm(n, seeded(cfg.seed), torch::kInt64);
    s.train = take(train, perm.slice(0, 0, n_train));
    s.val = take(train, perm.slice(0, n_train, n_train + cfg.val_samples));
  } else {
    if (cfg.train_samples > n)
      throw std::invalid_argument("data.train_samples=" + std::to_string(cfg.train_samples) + " exceeds the " +
                                  std::to_string(n) + " training images");
    s.train = cfg.train_samples > 0 ? take(train, torch::randperm(n, seeded(cfg.seed), torch::kInt64).slice(0, 0, cfg.train_samples)) : train;
    s.val = cfg.val_samples > 0 ? take(val, torch::arange(std::min(cfg.val_samples, val.size()))) : val;
  }
  s.test = cfg.eval_samples > 0 ? take(test, torch::arange(std::min(cfg.eval_samples, test.size()))) : test;
  // One skip log for the run: the splits may share files.
  s.val.skipped = s.test.skipped = s.train.skipped;
  return s;
}

Splits load_file_splits(const DataConfig& cfg, const ViTConfig& model) {
  if (cfg.bad_images != "error" && cfg.bad_images != "skip")
    throw std::invalid_argument("data.bad_images=" + cfg.bad_images + " is not one of error, skip");
  if (cfg.workers < 0) throw std::invalid_argument("data.workers=" + std::to_string(cfg.workers) + " must be >= 0");
  if (cfg.prefetch < 1) throw std::invalid_argument("data.prefetch=" + std::to_string(cfg.prefetch) + " must be >= 1");
  if (model.in_chans != 1 && model.in_chans != 3)
    throw std::invalid_argument("model.in_chans=" + std::to_string(model.in_chans) + ": image files decode to 1 or 3 channels");
  data::check_transform(transform_spec(cfg, model, true));
  if (cfg.dataset == "imagefolder") {
    data::FolderIndex f = data::index_imagefolder(cfg.root);
    const auto classes = parse_classes(cfg.classes, static_cast<int64_t>(f.classes.size()));
    if (model.num_classes != static_cast<int64_t>(classes.size()))
      throw std::invalid_argument("model.num_classes=" + std::to_string(model.num_classes) + " but data.root=" + cfg.root +
                                  " has " + std::to_string(classes.size()) + " classes" +
                                  (cfg.classes.empty() ? std::string() : " in data.classes=" + cfg.classes));
    if (f.ignored_files > 0) spdlog::info("imagefolder {}: ignored {} files without a .jpg/.jpeg/.png name", cfg.root, f.ignored_files);
    const auto k = static_cast<int64_t>(f.classes.size());
    auto pick = [&](const data::FileIndex& i) { return select_file_classes(from_index(i, k, f.classes), classes); };
    return finish_file_splits(cfg, pick(f.train), f.has_val ? pick(f.val) : Dataset(), f.has_val, pick(f.test));
  }
  if (cfg.train_list.empty() || cfg.test_list.empty())
    throw std::invalid_argument("data.dataset=filelist needs data.train_list and data.test_list (data.val_list optional)");
  const int64_t k = model.num_classes;
  std::vector<std::string> names;
  for (int64_t c = 0; c < k; ++c) names.push_back(std::to_string(c));
  auto list = [&](const std::string& file, const char* key) { return from_index(data::index_filelist(cfg.root, file, key, k), k, names); };
  Dataset train = list(cfg.train_list, "data.train_list"), test = list(cfg.test_list, "data.test_list");
  Dataset val = cfg.val_list.empty() ? Dataset() : list(cfg.val_list, "data.val_list");
  return finish_file_splits(cfg, train, val, !cfg.val_list.empty(), test);
}

}  // namespace

std::string describe(const Splits& s, const DataConfig& cfg) {
  return cfg.dataset + " " + cfg.root + ": " + std::to_string(s.train.num_classes) + " classes, " +
         std::to_string(s.train.size()) + " train / " + std::to_string(s.val.size()) + " val / " +
         std::to_string(s.test.size()) + " test images";
}

Splits load_splits(const DataConfig& cfg, const ViTConfig& model) {
  if (cfg.batch_size <= 0) throw std::invalid_argument("data.batch_size=" + std::to_string(cfg.batch_size) + " must be positive");
  channel_stats(cfg, false, model.in_chans);
  if (cfg.dataset == "imagefolder" || cfg.dataset == "filelist") return load_file_splits(cfg, model);
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
    throw std::invalid_argument("data.dataset=" + cfg.dataset + " is not one of fashion_mnist, synthetic, imagefolder, filelist");

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
  const std::vector<std::string> names = {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                          "Sandal",      "Shirt",   "Sneaker",  "Bag",   "Ankle boot"};
  for (int64_t c : classes) s.train.class_names.push_back(names[static_cast<size_t>(c)]);
  s.val.class_names = s.test.class_names = s.train.class_names;
  return s;
}

namespace {

// Decoder threads run their tensor ops on one thread: the compute threads own the cores.
// (at::parallel_for sets a thread's OpenMP team size at its first call, so that comes first.)
void single_threaded_ops() {
  at::internal::lazy_init_num_threads();
  omp_set_num_threads(1);
}

// Sample `index`, or under data.bad_images=skip the next one of its class that decodes.
torch::Tensor decode_sample(const Dataset& ds, int64_t index, uint64_t seed, const data::TransformSpec& t,
                            const ViTConfig& model, const DataConfig& cfg) {
  const int64_t n = ds.size();
  auto labels = ds.labels.accessor<int64_t, 1>();
  for (int64_t k = 0; k < n; ++k) {
    const int64_t i = (index + k) % n;
    if (k > 0 && labels[i] != labels[index]) continue;
    const std::string& path = ds.files[static_cast<size_t>(i)];
    try {
      return data::apply_transform(data::decode_file(path, static_cast<int>(model.in_chans)), t, seed);
    } catch (const data::DecodeError& e) {
      if (cfg.bad_images != "skip") throw;
      std::lock_guard<std::mutex> l(ds.skipped->m);
      if (ds.skipped->files.insert(path).second) spdlog::warn("data.bad_images=skip: skipping {}", e.what());
    }
  }
  throw std::runtime_error("data.bad_images=skip: no image of class " + std::to_string(labels[index]) + " decodes");
}

}  // namespace

torch::Tensor load_sample(const Dataset& ds, int64_t index, int64_t epoch, const ViTConfig& model, const DataConfig& cfg,
                          bool train) {
  return decode_sample(ds, index, data::sample_seed(cfg.seed, epoch, index), transform_spec(cfg, model, train), model, cfg);
}

torch::Tensor preprocess(const Dataset& ds, const torch::Tensor& idx, const ViTConfig& model, const DataConfig& cfg) {
  if (ds.file_backed()) {
    const int64_t n = idx.size(0);
    torch::Tensor out = torch::empty({n, model.in_chans, model.image_size, model.image_size});
    const data::TransformSpec t = transform_spec(cfg, model, false);
    const int threads = static_cast<int>(std::min<int64_t>(n, cfg.workers > 0 ? cfg.workers : default_workers()));
    std::atomic<int64_t> next{0};
    std::vector<std::exception_ptr> errors(static_cast<size_t>(std::max(threads, 1)));
    auto acc = idx.accessor<int64_t, 1>();
    auto run = [&](int w) {
      single_threaded_ops();
      try {
        for (int64_t i; (i = next++) < n;) out[i].copy_(decode_sample(ds, acc[i], 0, t, model, cfg));
      } catch (...) {
        errors[static_cast<size_t>(w)] = std::current_exception();
        next = n;
      }
    };
    std::vector<std::thread> pool;
    for (int w = 0; w < threads; ++w) pool.emplace_back(run, w);
    for (auto& th : pool) th.join();
    for (auto& e : errors)
      if (e) std::rethrow_exception(e);
    return out;
  }
  torch::Tensor x = ds.images.index_select(0, idx);
  if (x.scalar_type() != torch::kUInt8) return x.to(torch::kFloat32);  // synthetic: already model-ready
  x = x.unsqueeze(1).to(torch::kFloat32).div_(255.0);                  // [n, 1, H, W]
  if (x.size(2) != model.image_size || x.size(3) != model.image_size)
    x = torch::nn::functional::interpolate(x, torch::nn::functional::InterpolateFuncOptions()
                                                  .size(std::vector<int64_t>{model.image_size, model.image_size})
                                                  .mode(torch::kBilinear)
                                                  .align_corners(false));
  const auto mean = channel_stats(cfg, true, model.in_chans), stdev = channel_stats(cfg, false, model.in_chans);
  if (std::all_of(mean.begin(), mean.end(), [&](double v) { return v == mean[0]; }) &&
      std::all_of(stdev.begin(), stdev.end(), [&](double v) { return v == stdev[0]; })) {
    x = x.sub_(mean[0]).div_(stdev[0]);
    return model.in_chans == 1 ? x : x.expand({x.size(0), model.in_chans, x.size(2), x.size(3)}).contiguous();
  }
  x = x.expand({x.size(0), model.in_chans, x.size(2), x.size(3)}).contiguous();
  for (int64_t c = 0; c < model.in_chans; ++c) x.select(1, c).sub_(mean[static_cast<size_t>(c)]).div_(stdev[static_cast<size_t>(c)]);
  return x;
}

torch::Tensor batch_indices(int64_t n, int64_t global_batch, uint64_t seed, int64_t step, int dp_rank, int dp,
                            std::vector<int64_t>* epochs) {
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
    if (epochs) epochs->push_back(epoch);
  }
  return torch::tensor(out, torch::kInt64);
}

Prefetcher::Prefetcher(const Dataset& ds, const ViTConfig& model, const DataConfig& cfg, int dp_rank, int dp, bool decode)
    : ds_(ds), model_(model), cfg_(cfg), dp_rank_(dp_rank), dp_(dp), decode_(decode),
      workers_(cfg.workers > 0 ? cfg.workers : default_workers()),
      units_(ds.file_backed() ? cfg.batch_size / dp : 1) {
  cfg_.prefetch = std::max(1, cfg.prefetch);
}

Prefetcher::~Prefetcher() { stop(); }

void Prefetcher::start(int64_t step) {
  stop();
  queue_.clear();
  first_ = consumer_ = step;
  next_job_ = 0;
  stopping_ = false;
  if (!decode_) return;
  for (int w = 0; w < workers_; ++w) threads_.emplace_back([this] { work(); });
}

void Prefetcher::stop() {
  {
    std::lock_guard<std::mutex> l(m_);
    stopping_ = true;
  }
  work_cv_.notify_all();
  for (auto& t : threads_) t.join();
  threads_.clear();
}

std::shared_ptr<Prefetcher::Pending> Prefetcher::pending(int64_t step) {
  auto& p = queue_[step];
  if (!p) {
    p = std::make_shared<Pending>();
    p->idx = batch_indices(ds_.size(), cfg_.batch_size, cfg_.seed, step, dp_rank_, dp_, &p->epochs);
    p->labels = ds_.labels.index_select(0, p->idx);
    if (ds_.file_backed()) p->images = torch::empty({p->idx.size(0), model_.in_chans, model_.image_size, model_.image_size});
  }
  return p;
}

void Prefetcher::work() {
  single_threaded_ops();
  const data::TransformSpec t = transform_spec(cfg_, model_, true);
  for (;;) {
    std::shared_ptr<Pending> p;
    int64_t slot = 0;
    {
      std::unique_lock<std::mutex> l(m_);
      work_cv_.wait(l, [&] { return stopping_ || first_ + next_job_ / units_ < consumer_ + cfg_.prefetch; });
      if (stopping_) return;
      const int64_t job = next_job_++;
      p = pending(first_ + job / units_);
      slot = job % units_;
    }
    try {
      if (ds_.file_backed()) {
        const int64_t index = p->idx[slot].item<int64_t>(), epoch = p->epochs[static_cast<size_t>(slot)];
        if (!skip_ || !skip_(index))
          p->images[slot].copy_(decode_sample(ds_, index, data::sample_seed(cfg_.seed, epoch, index), t, model_, cfg_));
      } else if (!skip_) {
        p->images = preprocess(ds_, p->idx, model_, cfg_);
      } else {  // only the rows not skipped, each as the whole batch would give it (per image)
        std::vector<int64_t> rows;
        const auto* id = p->idx.data_ptr<int64_t>();
        for (int64_t j = 0; j < p->idx.numel(); ++j)
          if (!skip_(id[j])) rows.push_back(j);
        torch::Tensor images = torch::empty({p->idx.size(0), model_.in_chans, model_.image_size, model_.image_size});
        if (!rows.empty()) {
          torch::Tensor r = torch::tensor(rows, torch::kInt64);
          images.index_copy_(0, r, preprocess(ds_, p->idx.index_select(0, r), model_, cfg_));
        }
        p->images = images;
      }
    } catch (...) {
      std::lock_guard<std::mutex> l(m_);
      if (!p->error) p->error = std::current_exception();
    }
    {
      std::lock_guard<std::mutex> l(m_);
      ++p->done;
    }
    ready_cv_.notify_all();
  }
}

Batch Prefetcher::get(int64_t step) {
  if (first_ < 0 || step != consumer_) start(step);
  std::shared_ptr<Pending> p;
  {
    std::unique_lock<std::mutex> l(m_);
    p = pending(step);
    if (decode_) {
      const auto t0 = std::chrono::steady_clock::now();
      ready_cv_.wait(l, [&] { return p->done == units_; });
      wait_s_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    queue_.erase(step);
    consumer_ = step + 1;
  }
  work_cv_.notify_all();
  if (p->error) std::rethrow_exception(p->error);
  return {decode_ ? p->images : torch::Tensor(), p->labels, p->idx};
}

}  // namespace shardtune
