#include "trainer/trainer.h"

#include <torch/csrc/autograd/profiler_legacy.h>

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>

#include "common/runtime.h"
#include "common/device.h"
#include "common/log.h"
#include "common/signals.h"
#include "common/torch_device.h"
#include "distributed/grad_sync.h"
#include "io/atomic_file.h"
#include "io/strict_json.h"
#include "models/checkpoint.h"
#include "models/vit.h"
#include "ops/ops.h"
#include "peft/adapter_io.h"
#include "peft/method.h"
#include "sharding/stage_model.h"
#include "trainer/backbone_cache.h"
#include "trainer/checkpoint.h"

namespace shardtune {

namespace fs = std::filesystem;

namespace {

double peak_rss_mb() {
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_maxrss) * 1024.0 / 1e6;  // ru_maxrss is in KiB on Linux; MB = 1e6 bytes
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

// Linear warm-up to lr over warmup_steps, then cosine decay to 0 at `total`.
double lr_at(const TrainConfig& t, int64_t step, int64_t total) {
  if (step < t.warmup_steps) return t.lr * static_cast<double>(step + 1) / static_cast<double>(t.warmup_steps);
  const double span = std::max<int64_t>(1, total - t.warmup_steps);
  return t.lr * 0.5 * (1.0 + std::cos(M_PI * static_cast<double>(step - t.warmup_steps) / span));
}

// One double reduced over a group (all ranks of it call this).
double reduce(ProcessGroup& g, double v, ReduceOp op) {
  torch::Tensor t = torch::tensor({v}, torch::kFloat64);
  g.allreduce(t, op)->wait();
  return t.item<double>();
}

torch::ScalarType compute_dtype(const RunSpec& spec) {
  return spec.train.precision == "bf16" ? torch::kBFloat16 : torch::kFloat32;
}

// --- the device ----------------------------------------------------------------------------

torch::Device torch_device_of(const DeviceChoice& d) {
  return d.cuda() ? torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(d.index)) : torch::Device(torch::kCPU);
}

// `t` on the mesh's device: on the CPU `t` itself, so the CPU path is unchanged.
torch::Tensor on_device(const torch::Tensor& t, const Mesh& mesh) {
  return mesh.device.cuda() ? t.to(torch_device_of(mesh.device)) : t;
}

// The built stage (frozen weights, PEFT parameters, buffers) on the mesh's device, before the
// optimizer and the gradient buckets are made from its parameters. Module::to moves each
// tensor in place (set_data), so the PEFT state's handles follow.
void place_model(StageModel& b, const Mesh& mesh) {
  if (!mesh.device.cuda()) return;
  b.model->to(torch_device_of(mesh.device));
  torch_device::reset_peak(mesh.device.index);  // the peak from here on: the run's
}
}  // namespace

// The CPU-only operators (oneDNN frozen GEMMs, the AVX-512 bf16 kernels, the measured choice)
// never run on a GPU: there the step takes LibTorch's own ops (ops::torch_ops).
std::shared_ptr<const ops::Ops> ops_for(const TrainConfig& train, bool cuda) {
  if (cuda) return ops::torch_ops();
  ops::CpuOptions o;
  o.frozen_gemm = ops::parse_frozen_gemm(train.frozen_gemm);
  o.bf16_kernels = train.bf16_kernels;
  o.cache_dir = train.kernel_cache;
  return ops::make_cpu_ops(o);
}

namespace {

StageModel build(const RunSpec& spec, const Mesh& mesh, const std::string& adapter_dir = "") {
  ModelSpec m;
  m.model = spec.model;
  m.checkpoint = spec.checkpoint;
  m.load_head = spec.load_head;
  m.peft = spec.peft;
  m.adapter_dir = adapter_dir;
  m.seed = spec.train.seed;
  m.precision = spec.train.precision;
  m.ops = ops_for(spec.train, mesh.device.cuda());
  return build_stage_model(m, mesh);
}

// Top-1 over `ds`, each dp rank taking a contiguous share through the pipeline stages
// (all ranks call it).
double top1(StageModel& b, const Dataset& ds, const RunSpec& spec, const Mesh& mesh) {
  if (ds.size() == 0) return std::nan("");
  torch::NoGradGuard no_grad;
  const bool was_training = b.model->is_training();
  b.model->eval();
  const int64_t n = ds.size(), dp = mesh.dims.dp, r = mesh.dp_rank();
  const int64_t begin = n * r / dp, end = n * (r + 1) / dp;
  double correct = 0;
  auto forward = [&](const torch::Tensor& x) { return b.model->forward(x); };
  for (int64_t i = begin; i < end; i += 256) {
    torch::Tensor idx = torch::arange(i, std::min(end, i + 256), torch::kInt64);
    torch::Tensor images =
        b.role.first() ? on_device(preprocess(ds, idx, spec.model, spec.data).to(compute_dtype(spec)), mesh) : torch::Tensor();
    torch::Tensor logits = pipeline_forward(images, b.role, forward, mesh.pp.get());
    if (b.role.last()) correct += logits.argmax(1).cpu().eq(ds.labels.index_select(0, idx)).sum().item<double>();
  }
  b.model->train(was_training);
  return reduce(*mesh.dp, reduce(*mesh.pp, correct, ReduceOp::Sum), ReduceOp::Sum) / static_cast<double>(n);
}

// --- metrics ---------------------------------------------------------------------------------

// metrics.jsonl: a fresh run starts it anew; a resumed run keeps the lines up to its
// checkpoint's step (dropping what the interrupted run logged after it) and appends.
class Metrics {
 public:
  Metrics(const std::string& dir, bool writer, int64_t start_step) : writer_(writer) {
    if (!writer_) return;
    const std::string path = dir + "/metrics.jsonl";
    std::string kept;
    if (start_step > 0) {
      std::ifstream in(path);
      for (std::string line; std::getline(in, line);) {
        try {
          if (json::to_int64(json::at(json::parse(line), "step")) <= start_step) kept += line + "\n";
        } catch (const std::exception&) {  // a torn last line of a killed run
        }
      }
    }
    io::write_text_atomically(path, kept);
    out_ = std::fopen(path.c_str(), "a");
    if (!out_) throw std::runtime_error(path + ": cannot open: " + std::strerror(errno));
    path_ = path;
  }
  ~Metrics() {
    if (out_) std::fclose(out_);
  }
  Metrics(const Metrics&) = delete;
  Metrics& operator=(const Metrics&) = delete;
  // A line is on disk (in the page cache) or the run stops naming the file: a full disk must
  // not go unnoticed until the checkpoint.
  void write(const json::Json& line) {
    if (!writer_) return;
    const std::string text = json::dump(line) + "\n";
    if (std::fwrite(text.data(), 1, text.size(), out_) != text.size() || std::fflush(out_) != 0)
      throw std::runtime_error(path_ + ": write failed: " + std::strerror(errno));
  }

 private:
  bool writer_;
  std::FILE* out_ = nullptr;
  std::string path_;
};

std::string progress_line(int64_t step, int64_t total, double loss, double ips, double eta_s) {
  const int width = 24;
  const int filled = static_cast<int>(width * step / std::max<int64_t>(1, total));
  std::string bar = "[" + std::string(static_cast<size_t>(filled), '=') + std::string(static_cast<size_t>(width - filled), ' ') + "]";
  char buf[160];
  std::snprintf(buf, sizeof(buf), "%s step %lld/%lld  loss %.4f  %.1f img/s  ETA %.0fs", bar.c_str(),
                static_cast<long long>(step), static_cast<long long>(total), loss, ips, eta_s);
  return buf;
}

}  // namespace

// --- the run, step by step ----------------------------------------------------------------

namespace {

// Everything one rank holds for a training run.
struct Run {
  Run(const RunSpec& s, const Mesh& m) : spec(s), mesh(m), rank0(m.rank == 0) {}
  const RunSpec& spec;
  const Mesh& mesh;
  bool rank0;
  std::unique_ptr<OutputDirLock> lock;    // rank 0, the only writer, holds output.dir
  Splits data;
  StageModel b;
  std::vector<torch::Tensor> params;      // this stage's trainable tensors
  std::unique_ptr<torch::optim::AdamW> opt;  // none on a stage before every trainable parameter
  std::unique_ptr<GradSync> sync;
  int64_t total = 0;                      // optimizer steps of the whole run
  int64_t microbatches = 1;
  std::vector<PipeOp> ops;                // this stage's schedule of one step
  int64_t trainable_params = 0;           // over every stage
  double pipe_forward_bytes = 0, pipe_backward_bytes = 0;  // this rank's pipeline sends in the last step
  std::unique_ptr<BackboneCache> cache;   // train.cache_backbone
  int64_t cache_hits = 0, cache_misses = 0;  // samples read from it / computed, over this run
  double loop_seconds = 0;                // the training loop of this run, wall clock (rank 0's)
};

// What one optimizer step measured.
struct StepStats {
  double loss = 0, grad_norm = 0, lr = 0, wait_fraction = 0;
  double pipe_forward_bytes = 0, pipe_backward_bytes = 0;  // this rank sent to its pipeline neighbours
};

// Locks output.dir, loads the data, builds this rank's stage, its optimizer and gradient sync.
void set_up(Run& r) {
  const RunSpec& spec = r.spec;
  // Every rank indexes the data first: a bad folder or list file fails them all alike, before any collective.
  r.data = load_splits(spec.data, spec.model);
  if (r.rank0) spdlog::info("{}", describe(r.data, spec.data));
  if (r.rank0) {
    fs::create_directories(spec.output.dir);
    r.lock = std::make_unique<OutputDirLock>(spec.output.dir);
    remove_stale_temporaries(spec.output.dir);
  }
  r.mesh.world->barrier();
  r.b = build(spec, r.mesh, spec.peft.init_adapter);  // a resumed checkpoint's weights replace these later
  place_model(r.b, r.mesh);
  for (const auto& [_, t] : r.b.peft.trainable) r.params.push_back(t);
  if (!r.params.empty())
    r.opt = std::make_unique<torch::optim::AdamW>(r.params, torch::optim::AdamWOptions(spec.train.lr)
                                                                .betas({spec.train.beta1, spec.train.beta2})
                                                                .weight_decay(spec.train.weight_decay));
  r.sync = std::make_unique<GradSync>(r.params, r.mesh.dp, spec.bucket_mb);
  r.total = spec.train.epochs > 0
                ? (spec.train.epochs * r.data.train.size() + spec.data.batch_size - 1) / spec.data.batch_size
                : spec.train.steps;
  // Micro-batches: equal chunks of the local batch, each loss scaled by 1/m so the accumulated
  // gradient is the whole batch's mean; the dp buckets launch during the last backward.
  r.microbatches = std::max<int64_t>(1, spec.microbatches);
  r.ops = pipeline_schedule(spec.schedule, r.b.role.stage, r.b.role.stages, static_cast<int>(r.microbatches));
  if (spec.train.cache_backbone) {
    // This rank sees its share of every global batch: at most the whole set over the run.
    const int64_t dp = r.mesh.dims.dp, seen = r.total * ((spec.data.batch_size + dp - 1) / dp);
    r.cache = std::make_unique<BackboneCache>(r.data.train.size(), r.b.model->frozen_output_shapes(), compute_dtype(spec),
                                              spec.train.cache_max_gb, seen);
    if (r.rank0)
      spdlog::info("backbone cache: {:.3g} MB an image, up to {:.3g} GB per rank", r.cache->bytes_per_image() / 1e6,
                   r.cache->bytes_per_image() * static_cast<double>(std::min(r.data.train.size(), seen)) / 1e9);
  }
}

// The step to start from: 0, or the checkpoint's (all ranks call it).
int64_t resume(Run& r) {
  const std::string from = resume_path(r.spec, r.rank0);
  if (from.empty()) return 0;
  const int64_t step = load_checkpoint(from, r.b, r.opt.get(), r.spec, r.mesh);
  spdlog::info("resumed from {} at step {}", from, step);
  return step;
}

void log_start(Run& r) {
  // Counted over the stages, once per stage (tp ranks hold shards of the same tensors).
  double local_params = 0, local_trainable = 0;
  for (const auto& p : r.b.model->parameters()) local_params += static_cast<double>(p.numel());
  for (const auto& p : r.params) local_trainable += static_cast<double>(p.numel());
  r.trainable_params = static_cast<int64_t>(reduce(*r.mesh.pp, local_trainable, ReduceOp::Sum));
  const RunSpec& spec = r.spec;
  spdlog::info("train: {} with {} on {} ({} train / {} val / {} test images), {} trainable of {} parameters, {} steps; "
               "this rank: blocks [{}, {}), {:.0f} parameters",
               spec.model.arch, spec.peft.method, r.mesh.dims.str(), r.data.train.size(), r.data.val.size(),
               r.data.test.size(), r.trainable_params, spec.model.param_count(), r.total, r.b.model->part.first_block,
               r.b.model->part.end_block, local_params);
}

// One optimizer step (all ranks): the pipeline schedule over the micro-batches, dp gradient
// sync, global-norm clipping, AdamW at the scheduled learning rate.
StepStats train_step(Run& r, const Batch& batch, int64_t step) {
  const RunSpec& spec = r.spec;
  const Mesh& mesh = r.mesh;
  const int64_t m = r.microbatches;
  if (r.opt) r.opt->zero_grad();
  // Stages after the first get no images (only the first decodes). With the cache, the rows of
  // cached samples were not decoded: only the others are read (images_of).
  const bool whole_batch = batch.images.defined() && !r.cache;
  auto images = whole_batch ? on_device(batch.images.to(compute_dtype(spec)), mesh).chunk(m)
                            : std::vector<torch::Tensor>(static_cast<size_t>(m));
  auto images_of = [&](const torch::Tensor& rows) {
    return on_device(batch.images.index_select(0, rows).to(compute_dtype(spec)), mesh);
  };
  auto labels = on_device(batch.labels, mesh).chunk(m);
  double local_loss = 0;
  StageHooks hooks;
  hooks.input = [&](int mb) { return images[static_cast<size_t>(mb)]; };
  hooks.forward = [&](const torch::Tensor& x) { return r.b.model->forward(x); };
  std::vector<torch::Tensor> cached;  // train.cache_backbone: the batch's frozen outputs
  if (r.cache) {
    // The backbone runs on the samples not cached yet (their images were decoded), once, as
    // one batch; a micro-batch's input is then its rows of the frozen outputs.
    std::vector<int64_t> missing;
    const torch::Tensor& idx = batch.indices;
    for (int64_t j = 0; j < idx.numel(); ++j)
      if (!r.cache->has(idx[j].item<int64_t>())) missing.push_back(j);
    if (!missing.empty()) {
      torch::Tensor rows = torch::tensor(missing, torch::kInt64);
      r.cache->put(idx.index_select(0, rows), r.b.model->frozen_outputs(images_of(rows)));
    }
    r.cache_misses += static_cast<int64_t>(missing.size());
    r.cache_hits += idx.numel() - static_cast<int64_t>(missing.size());
    cached = r.cache->get(idx);
    auto positions = torch::arange(idx.numel(), torch::kInt64).chunk(m);
    hooks.input = [positions](int mb) { return positions[static_cast<size_t>(mb)]; };
    hooks.forward = [&](const torch::Tensor& rows) {
      std::vector<torch::Tensor> mine;
      for (const auto& t : cached) mine.push_back(t.index_select(0, rows));
      return r.b.model->from_frozen_outputs(mine);
    };
  }
  hooks.loss = [&](int mb, const torch::Tensor& logits) {
    torch::Tensor loss = torch::nn::functional::cross_entropy(
        logits.to(torch::kFloat32), labels[static_cast<size_t>(mb)],
        torch::nn::functional::CrossEntropyFuncOptions().label_smoothing(spec.train.label_smoothing));
    local_loss += loss.item<double>() / static_cast<double>(m);
    return loss / static_cast<double>(m);
  };
  hooks.before_last_backward = [&] { r.sync->prepare_for_backward(); };
  PipelineTimes pt = run_pipeline(r.ops, r.b.role, hooks, mesh.pp.get());
  r.sync->finish();

  StepStats out;
  out.wait_fraction = pt.total_s > 0 ? pt.wait_s / pt.total_s : 0.0;
  out.pipe_forward_bytes = pt.forward_bytes;
  out.pipe_backward_bytes = pt.backward_bytes;
  // The loss lives on the last stage: summed over pp (others add 0), averaged over dp.
  out.loss = reduce(*mesh.dp, reduce(*mesh.pp, local_loss, ReduceOp::Sum), ReduceOp::Avg);
  if (!std::isfinite(out.loss))
    throw std::runtime_error("train: the loss is " + std::to_string(out.loss) + " at step " + std::to_string(step + 1) +
                             "; stopping (the last checkpoint is intact)");
  // Gradients are identical over dp (synced) and tp (summed in the regions): the norm sums
  // over the stages only.
  double sq = 0;
  for (auto& p : r.params)
    if (p.grad().defined()) sq += p.grad().pow(2).sum().item<double>();
  out.grad_norm = std::sqrt(reduce(*mesh.pp, sq, ReduceOp::Sum));
  if (spec.train.grad_clip > 0 && out.grad_norm > spec.train.grad_clip) {
    torch::NoGradGuard g;
    for (auto& p : r.params)
      if (p.grad().defined()) p.mutable_grad().mul_(spec.train.grad_clip / (out.grad_norm + 1e-6));
  }
  out.lr = lr_at(spec.train, step, r.total);
  if (r.opt) {
    for (auto& group : r.opt->param_groups()) static_cast<torch::optim::AdamWOptions&>(group.options()).lr(out.lr);
    r.opt->step();
  }
  return out;
}

// Test (and val) top-1 into metrics.jsonl (all ranks call it).
void evaluate(Run& r, int64_t step, Metrics& metrics) {
  json::Json ev;
  ev["step"] = step;
  ev["eval_top1"] = top1(r.b, r.data.test, r.spec, r.mesh);
  if (r.data.val.size() > 0) ev["val_top1"] = top1(r.b, r.data.val, r.spec, r.mesh);
  metrics.write(ev);
  spdlog::info("step {}: eval top-1 {:.4f}", step, ev["eval_top1"].get<double>());
}

// summary.json's GPU figures (rank 0): the device, its peak memory (LibTorch's caching
// allocator, max over ranks) and MFU as torchtitan reports it: the model FLOPs of a step
// (forward per image x batch x 3 for full fine-tuning, x 2 with a frozen backbone: no weight
// gradients) over the step time and every rank's dense bf16 peak (bf16_peak_flops; null for
// a GPU missing from its table).
void add_device_figures(json::Json& summary, const Run& r, double step_time_s, double peak_device_bytes) {
  const RunSpec& spec = r.spec;
  const std::string name = torch_device::name(r.mesh.device.index);
  summary["device"] = r.mesh.device.str();
  summary["device_name"] = name;
  summary["backend"] = backend_name(r.mesh.backend);
  summary["peak_device_memory_mb"] = peak_device_bytes / 1e6;
  const double flops = spec.model.forward_flops_per_image() * static_cast<double>(spec.data.batch_size) *
                       (spec.peft.method == "full" ? 3.0 : 2.0);
  summary["model_tflops_per_step"] = flops / 1e12;
  const auto peak = bf16_peak_flops(name);
  summary["bf16_peak_tflops"] = peak ? json::Json(*peak / 1e12) : json::Json(nullptr);
  const bool known = peak && step_time_s > 0;
  summary["mfu"] = known ? json::Json(flops / step_time_s / (*peak * r.mesh.dims.world)) : json::Json(nullptr);
}

// The final evaluation, adapter and summary.json (all ranks call it; rank 0 writes).
double finish_run(Run& r, int64_t step, Metrics& metrics, const std::vector<double>& step_times,
                  const std::vector<double>& wait_fractions, double data_wait_fraction) {
  const RunSpec& spec = r.spec;
  const Mesh& mesh = r.mesh;
  const double test_top1 = top1(r.b, r.data.test, spec, mesh);
  const double val_top1 = top1(r.b, r.data.val, spec, mesh);
  const double rss = reduce(*mesh.world, peak_rss_mb(), ReduceOp::Max);
  const double wait_fraction = reduce(*mesh.world, median(wait_fractions), ReduceOp::Max);
  const double loaded_bytes = reduce(*mesh.world, static_cast<double>(r.b.checkpoint_bytes), ReduceOp::Max);
  const double peak_device_bytes = reduce(
      *mesh.world, mesh.device.cuda() ? static_cast<double>(torch_device::peak_allocated_bytes(mesh.device.index)) : 0.0,
      ReduceOp::Max);
  const double data_wait = reduce(*mesh.world, data_wait_fraction, ReduceOp::Max);
  const double skipped = reduce(*mesh.world, static_cast<double>(r.data.train.skipped->count()), ReduceOp::Max);
  const double pipe_forward = reduce(*mesh.world, r.pipe_forward_bytes, ReduceOp::Sum);
  const double pipe_backward = reduce(*mesh.world, r.pipe_backward_bytes, ReduceOp::Sum);
  auto adapter = gather_trainable(r.b, mesh);
  if (r.rank0) {
    json::Json ev;
    ev["step"] = step;
    ev["eval_top1"] = test_top1;
    if (r.data.val.size() > 0) ev["val_top1"] = val_top1;
    metrics.write(ev);
    save_adapter(spec.output.dir + "/adapter", PeftState{spec.peft.method, adapter, {}}, spec.peft, spec.model);
    write_class_names(spec.output.dir + "/classes.json", r.data.train.class_names);
    write_class_names(spec.output.dir + "/adapter/classes.json", r.data.train.class_names);
    if (spec.peft.method == "full")  // a pretrained backbone in timm naming (every tensor is trainable)
      save_tensors(spec.output.dir + "/backbone.safetensors", adapter, {{"format", "pt"}});
    json::Json summary;
    summary["eval_top1"] = test_top1;
    summary["val_top1"] = r.data.val.size() > 0 ? json::Json(val_top1) : json::Json(nullptr);
    summary["trainable_params"] = r.trainable_params;
    summary["total_params"] = static_cast<int64_t>(spec.model.param_count());
    summary["steps"] = step;
    summary["train_loop_s"] = r.loop_seconds;  // this run's steps (and periodic evals), wall clock
    const double st = median(step_times);
    summary["step_time_s"] = st;
    summary["images_per_sec"] = st > 0 ? static_cast<double>(spec.data.batch_size) / st : 0.0;
    summary["peak_rss_mb"] = rss;
    summary["grad_sync_bytes_per_step"] = r.sync->bytes_per_step();
    summary["pipeline_wait_fraction"] = wait_fraction;
    // Activations sent forward and gradients sent back between stages in one step, all ranks.
    summary["pipeline_bytes_per_step"] = {{"forward", pipe_forward}, {"backward", pipe_backward}};
    summary["pipeline_bubble_ideal"] = ideal_bubble(mesh.dims.pp, static_cast<int>(r.microbatches));
    summary["checkpoint_bytes_read_max_rank"] = loaded_bytes;
    summary["data_wait_fraction"] = data_wait;  // share of the step time spent waiting for the loader (max rank)
    summary["skipped_images"] = static_cast<int64_t>(skipped);
    if (r.cache) {  // rank 0's figures (every dp rank caches its own share)
      json::Json c;
      c["images"] = r.cache->images();
      c["mb"] = r.cache->bytes() / 1e6;
      c["hits"] = r.cache_hits;
      c["misses"] = r.cache_misses;
      summary["backbone_cache"] = c;
    }
    json::Json mj;
    mj["dp"] = mesh.dims.dp;
    mj["tp"] = mesh.dims.tp;
    mj["pp"] = mesh.dims.pp;
    mj["microbatches"] = r.microbatches;
    mj["schedule"] = spec.schedule;
    summary["mesh"] = mj;
    summary["precision"] = spec.train.precision;
    {
      const nlohmann::json kernels = r.b.model->ops->report();  // what ops/ chose, and the measured times
      summary["frozen_gemm"] = kernels.value("frozen_gemm", "");
      summary["bf16_kernels"] = kernels.value("bf16_kernels", false);
      summary["kernels"] = kernels;
    }
    summary["method"] = spec.peft.method;
    if (mesh.device.cuda()) add_device_figures(summary, r, st, peak_device_bytes);
    io::write_text_atomically(spec.output.dir + "/summary.json", json::dump(summary, 2) + "\n");
  }
  spdlog::info("done: eval top-1 {:.4f} on {} test images; outputs in {}", test_top1, r.data.test.size(), spec.output.dir);
  return test_top1;
}

std::unique_ptr<torch::autograd::profiler::RecordProfile> maybe_profile(const RunSpec& spec, int64_t step, int rank) {
  if (step + 1 != spec.train.profile_step) return nullptr;
  return std::make_unique<torch::autograd::profiler::RecordProfile>(
      spec.output.dir + "/profile_step_" + std::to_string(step + 1) + "_rank" + std::to_string(rank) + ".json");
}

}  // namespace

double train(const RunSpec& spec, const Mesh& mesh) {
  if (spec.peft.method == "none") throw std::invalid_argument("peft.method=none has nothing to train");
  if (spec.peft.method == "full" && mesh.dims.tp > 1)
    throw std::invalid_argument("peft.method=full with parallel.tp=" + std::to_string(mesh.dims.tp) +
                                ": full fine-tuning trains the sharded weights themselves; use parallel.tp=1");
  Run r(spec, mesh);
  set_up(r);
  int64_t step = resume(r);
  log_start(r);

  Metrics metrics(spec.output.dir, r.rank0, step);
  Prefetcher prefetch(r.data.train, spec.model, spec.data, mesh.dp_rank(), mesh.dims.dp, r.b.role.first());
  if (r.cache) prefetch.skip_when([cache = r.cache.get()](int64_t index) { return cache->has(index); });
  double busy_s = 0, data_wait_s = 0;  // over the steps after the first (which fills the queue)
  const bool tty = r.rank0 && ::isatty(STDERR_FILENO);
  std::vector<double> step_times, wait_fractions;
  const int64_t first_step = step;
  const auto loop_start = std::chrono::steady_clock::now();
  reuse_large_blocks();  // the model is loaded: from here on, big activation blocks stay for reuse
  r.b.model->train();
  while (step < r.total) {
    auto profile = maybe_profile(spec, step, mesh.rank);
    auto t0 = std::chrono::steady_clock::now();
    const double waited = prefetch.wait_seconds();
    const StepStats s = train_step(r, prefetch.get(step), step);
    ++step;
    wait_fractions.push_back(s.wait_fraction);
    r.pipe_forward_bytes = s.pipe_forward_bytes;
    r.pipe_backward_bytes = s.pipe_backward_bytes;
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    // The profiled step runs slower (the profiler's own cost): left out of the median.
    if (step > first_step + 1 && !profile) step_times.push_back(secs);
    if (step > first_step + 1) busy_s += secs, data_wait_s += prefetch.wait_seconds() - waited;
    profile.reset();  // writes the trace
    if (step == first_step + 1) r.b.model->ops->log_choices();  // the step's kernels are all chosen now

    const double ips = static_cast<double>(spec.data.batch_size) / secs;
    json::Json line;
    line["step"] = step;
    line["loss"] = s.loss;
    line["lr"] = s.lr;
    line["grad_norm"] = s.grad_norm;
    line["images_per_sec"] = ips;
    metrics.write(line);
    const double eta = median(step_times.empty() ? std::vector<double>{secs} : step_times) * static_cast<double>(r.total - step);
    if (tty) {
      std::fprintf(stderr, "\r%s", progress_line(step, r.total, s.loss, ips, eta).c_str());
      if (step == r.total) std::fprintf(stderr, "\n");
    } else if (step % std::max<int64_t>(1, spec.train.log_every) == 0 || step == r.total) {
      spdlog::info("step {}/{}  loss {:.4f}  lr {:.3g}  grad_norm {:.3f}  {:.1f} img/s  ETA {:.0f}s", step, r.total,
                   s.loss, s.lr, s.grad_norm, ips, eta);
    }

    if (spec.train.eval_every > 0 && step % spec.train.eval_every == 0 && step < r.total) {
      if (tty) std::fprintf(stderr, "\n");
      evaluate(r, step, metrics);
    }
    const bool exit_now = spec.train.exit_interval > 0 && step - first_step >= spec.train.exit_interval && step < r.total;
    // Every rank must agree to stop, or one would wait in the next step's collectives.
    const bool signalled = reduce(*mesh.world, stop_requested() ? 1.0 : 0.0, ReduceOp::Max) > 0;
    const bool periodic = spec.output.checkpoint_every > 0 && step % spec.output.checkpoint_every == 0;
    if (periodic || exit_now || signalled) save_checkpoint(spec, r.b, r.opt.get(), step, mesh);
    if (exit_now || signalled) {
      if (tty) std::fprintf(stderr, "\n");
      spdlog::info("stopping at step {} ({}); resume with output.resume=auto", step,
                   signalled ? "signal" : "train.exit_interval");
      mesh.world->barrier();
      return std::nan("");
    }
  }
  mesh.world->barrier();
  r.loop_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - loop_start).count();
  return finish_run(r, step, metrics, step_times, wait_fractions, busy_s > 0 ? data_wait_s / busy_s : 0.0);
}

double evaluate_adapter(const RunSpec& spec, const std::string& adapter_dir, const Mesh& mesh) {
  AdapterConfig a = read_adapter_config(adapter_dir);
  check_adapter_fits(a, spec.model, adapter_dir);
  RunSpec s = spec;
  s.peft = a.peft;
  Splits data = load_splits(s.data, s.model);
  StageModel b = build(s, mesh, adapter_dir);
  place_model(b, mesh);
  reuse_large_blocks();
  const double acc = top1(b, data.test, s, mesh);
  if (mesh.rank == 0) {
    fs::create_directories(s.output.dir);
    json::Json out;
    out["eval_top1"] = acc;
    out["images"] = data.test.size();
    out["adapter"] = adapter_dir;
    io::write_text_atomically(s.output.dir + "/eval.json", json::dump(out, 2) + "\n");
  }
  spdlog::info("eval top-1 {:.4f} on {} test images ({} adapter from {})", acc, data.test.size(), a.peft.method,
               adapter_dir);
  return acc;
}

}  // namespace shardtune
