// shardtune: the command-line entry point. Reads top to bottom:
//   parse the subcommand and its options -> logging and runtime -> run the subcommand.
// Errors are exceptions, caught once here: usage errors exit 2, runtime errors exit 1.
#include <boost/program_options/options_description.hpp>
#include <boost/program_options/value_semantic.hpp>
#include <boost/program_options/variables_map.hpp>
#include <torch/torch.h>

#include <unistd.h>


#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "common/log.h"
#include "common/runtime.h"
#include "common/signals.h"
#include "data/decode.h"
#include "data/imagefolder.h"
#include "distributed/mesh.h"
#include "distributed/placement.h"
#include "distributed/topology.h"
#include "io/strict_json.h"
#include "launch/config.h"
#include "launch/plan.h"
#include "models/checkpoint.h"
#include "models/vit.h"
#include "peft/adapter_io.h"
#include "peft/method.h"
#include "peft/targets.h"
#include "sharding/pipeline.h"
#include "sharding/stage_model.h"
#include "trainer/data.h"
#include "trainer/trainer.h"

using namespace shardtune;
namespace po = boost::program_options;

namespace {

constexpr const char* kUsage =
    "usage: shardtune <command> [options]\n"
    "\n"
    "commands:\n"
    "  init     --config F --out FILE.safetensors       a randomly initialised backbone (timm names)\n"
    "  predict  --config F --input X --out Y [--adapter DIR]   logits for a batch of images\n"
    "  predict  --config F [--adapter DIR] --images A.jpg B.png ... | --image-dir D [--format table|jsonl]\n"
    "                                                    top-5 classes of image files\n"
    "  merge    --config F --adapter DIR --out FILE      fold a lora/ssf/fact_tt adapter into the backbone\n"
    "  train    --config F                               fine-tune (under mpirun/srun or alone)\n"
    "  eval     --config F --adapter DIR                 top-1 of backbone + adapter on the test split\n"
    "  plan     --config F --world-size N [--device-memory 80GB]   memory, communication, FLOPs per rank\n"
    "  data     --config F [--check] [--benchmark N]     class counts per split; decode every file; loader images/s\n"
    "\n"
    "Every command takes --config FILE (INI), --section.key VALUE overrides, --log-level, --help.\n"
    "'shardtune <command> --help' lists its options and every config key.\n";

po::options_description common_options() {
  po::options_description d("Common options");
  d.add_options()("help,h", "show this help")("config", po::value<std::string>(), "INI config file")(
      "log-level", po::value<std::string>()->default_value("info"), "trace|debug|info|warn|error|critical|off");
  return d;
}

std::string required(const po::variables_map& vm, const char* key) {
  if (!vm.count(key)) throw UsageError(std::string("--") + key + " is required");
  return vm[key].as<std::string>();
}

VisionTransformer build_model(const RunConfig& rc) {
  torch::manual_seed(rc.seed);
  return VisionTransformer(rc.model, StagePart::whole(rc.model), /*init=*/true, ops_for(rc.train, /*cuda=*/false));
}

// ---------------------------------------------------------------------------------------
// train / eval / predict / merge: every rank validates the mesh before any collective, then
// places itself (device, backend) and builds it. predict and merge run on the CPU (`cpu`).
Mesh mesh_for(const RunConfig& rc, const MpiRuntime& mpi, bool cpu = false) {
  MeshRequirements req;
  req.heads = rc.model.heads;
  req.mlp_dim = rc.model.mlp_dim;
  req.depth = rc.model.depth;
  req.global_batch = rc.data.batch_size;
  req.microbatches = rc.parallel.microbatches;
  ParallelDims dims;
  try {
    dims = ParallelDims::make(mpi.world_size(), rc.parallel.tp, rc.parallel.pp, req);
  } catch (const std::invalid_argument& e) {
    throw UsageError(e.what());
  }
  const Topology topo = discover_topology();
  const Placement place = cpu ? place_rank("cpu", "mpi", topo) : place_rank(rc.parallel.device, rc.parallel.backend, topo);
  // Every rank sees the same dims and device kind (place_rank agreed): no rank is left waiting.
  if (place.device.cuda() && dims.pp > 1)
    throw UsageError("parallel.device=cuda with parallel.pp=" + std::to_string(dims.pp) +
                     ": pipeline stages receive activations into CPU buffers (sharding/pipeline.cpp) so far; use "
                     "parallel.pp=1 or parallel.device=cpu");
  if (place.device.cuda() && dims.tp > 1)
    throw UsageError("parallel.device=cuda with parallel.tp=" + std::to_string(dims.tp) +
                     ": sharded layers index their rows with a CPU tensor (DenseLinear::shard_index) so far; use "
                     "parallel.tp=1 or parallel.device=cpu");
  Mesh mesh = make_mesh(dims, place.backend, place.device);
  log_topology(topo, dims);  // every rank's node and local rank; warns if a tp group spans nodes
  return mesh;
}

MpiRuntime* g_mpi = nullptr;  // set by main for the commands that run under MPI

// This rank's part of the backbone from model.checkpoint, with the adapter in `adapter_dir`
// applied if given (all ranks call it).
StageModel load_on_mesh(const RunConfig& rc, const std::string& adapter_dir, const Mesh& mesh, AdapterConfig* adapter) {
  if (rc.checkpoint.empty()) throw UsageError("model.checkpoint is not set (--model.checkpoint FILE)");
  ModelSpec spec;
  spec.model = rc.model;
  spec.checkpoint = rc.checkpoint;
  spec.seed = rc.seed;
  spec.peft.method = "none";
  spec.ops = ops_for(rc.train, mesh.device.cuda());  // the kernels training chooses, for inference too
  if (!adapter_dir.empty()) {  // check the cheap file first
    *adapter = read_adapter_config(adapter_dir);
    check_adapter_fits(*adapter, rc.model, adapter_dir);
    spec.peft = adapter->peft;
    spec.adapter_dir = adapter_dir;
  }
  StageModel m;
  try {
    m = build_stage_model(spec, mesh);
  } catch (const std::invalid_argument& e) {  // the adapter's targets or ranks do not fit this model
    if (adapter_dir.empty()) throw;
    throw std::invalid_argument(adapter_dir + "/adapter_config.json: " + e.what());
  }
  spdlog::info("loaded {} from {} on {}{}", rc.model.arch, rc.checkpoint, mesh.dims.str(),
               adapter_dir.empty() ? "" : " with the " + spec.peft.method + " adapter from " + adapter_dir);
  m.model->eval();
  reuse_large_blocks();  // loaded: eval batches' big blocks stay for reuse
  return m;
}

// ---------------------------------------------------------------------------------------
// init: a randomly initialised backbone, seeded, written in timm naming.
int cmd_init(const po::variables_map& vm) {
  RunConfig rc = run_config_from(vm);
  std::string out = required(vm, "out");
  VisionTransformer model = build_model(rc);
  spdlog::info("initialised {} ({} parameters, seed {})", rc.model.arch, rc.model.param_count(), rc.seed);
  save_tensors(out, state_of(*model), {{"format", "pt"}, {"shardtune_config", to_ini(rc)}});
  spdlog::info("wrote {}", out);
  return 0;
}

// ---------------------------------------------------------------------------------------
// predict: logits [B, num_classes] for input [B, C, H, W] (already normalised).
// The forward pass over `images` through the pipeline; the logits on rank 0 (all ranks call it).
torch::Tensor mesh_logits(StageModel& sm, const Mesh& mesh, const torch::Tensor& images, int64_t batch, int64_t num_classes) {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> chunks;
  auto forward = [&](const torch::Tensor& x) { return sm.model->forward(x); };
  for (int64_t i = 0; i < images.size(0); i += batch)
    chunks.push_back(pipeline_forward(images.slice(0, i, i + batch), sm.role, forward, mesh.pp.get()));
  torch::Tensor logits;
  if (sm.role.last()) logits = chunks.empty() ? torch::empty({0, num_classes}) : torch::cat(chunks, 0);
  if (mesh.dims.pp > 1 && mesh.dp_rank() == 0 && mesh.tp_rank() == 0) {  // the last stage hands them to rank 0
    if (sm.role.last()) {
      std::vector<torch::Tensor> keep;
      for (auto& w : send_tensor(*mesh.pp, logits, 0, keep)) w->wait();
    } else if (sm.role.first()) {
      logits = recv_tensor(*mesh.pp, mesh.dims.pp - 1);
    }
  }
  return logits;
}

// classes.json of the adapter, else of output.dir; names must match model.num_classes.
std::vector<std::string> class_names_for(const RunConfig& rc, const std::string& adapter_dir) {
  std::string path = adapter_dir.empty() ? "" : adapter_dir + "/classes.json";
  if (path.empty() || !std::filesystem::exists(path)) path = rc.output.dir + "/classes.json";
  auto names = read_class_names(path);
  if (!names.empty() && static_cast<int64_t>(names.size()) != rc.model.num_classes)
    throw std::runtime_error(path + ": " + std::to_string(names.size()) + " class names for model.num_classes=" +
                             std::to_string(rc.model.num_classes));
  return names;
}

// predict on image files: the config's eval transform, top-5 names and probabilities.
int predict_images(const po::variables_map& vm, RunConfig rc) {
  const std::string format = vm["format"].as<std::string>();
  if (format != "table" && format != "jsonl") throw UsageError("--format=" + format + " is not one of table, jsonl");
  const int64_t batch = vm["batch-size"].as<int64_t>();
  if (batch <= 0) throw UsageError("--batch-size=" + std::to_string(batch) + " must be positive");
  std::vector<std::string> files = vm.count("images") ? vm["images"].as<std::vector<std::string>>() : std::vector<std::string>{};
  if (vm.count("image-dir")) {
    const std::string dir = vm["image-dir"].as<std::string>();
    if (!std::filesystem::is_directory(dir)) throw UsageError("--image-dir=" + dir + ": not a folder");
    std::vector<std::string> found;
    for (const auto& e : std::filesystem::directory_iterator(dir))
      if (e.is_regular_file() && data::is_image_name(e.path().filename().string())) found.push_back(e.path().string());
    std::sort(found.begin(), found.end());
    if (found.empty()) throw UsageError("--image-dir=" + dir + ": no .jpg, .jpeg or .png file");
    files.insert(files.end(), found.begin(), found.end());
  }
  for (const auto& f : files)
    if (!std::filesystem::is_regular_file(f)) throw UsageError("--images: " + f + " does not exist");
  const std::string adapter_dir = vm.count("adapter") ? vm["adapter"].as<std::string>() : "";
  const auto names = class_names_for(rc, adapter_dir);
  Dataset ds;
  ds.files = files;
  ds.labels = torch::zeros({static_cast<int64_t>(files.size())}, torch::kInt64);
  rc.data.bad_images = "error";  // a prediction is never silently for another file
  torch::Tensor images = preprocess(ds, torch::arange(ds.size()), rc.model, rc.data);  // before any collective
  Mesh mesh = mesh_for(rc, *g_mpi);
  AdapterConfig adapter;
  StageModel sm = load_on_mesh(rc, adapter_dir, mesh, &adapter);
  torch::Tensor logits = mesh_logits(sm, mesh, images, batch, rc.model.num_classes);
  if (mesh.rank != 0) return 0;
  torch::Tensor probs = torch::softmax(logits.to(torch::kFloat32), 1);
  const int64_t k = std::min<int64_t>(5, probs.size(1));
  auto [p, idx] = probs.topk(k, 1);
  auto name = [&](int64_t c) { return names.empty() ? std::to_string(c) : names[static_cast<size_t>(c)]; };
  for (size_t i = 0; i < files.size(); ++i) {
    const auto r = static_cast<int64_t>(i);
    if (format == "jsonl") {
      json::Json line{{"image", files[i]}, {"top", json::Json::array()}};
      for (int64_t j = 0; j < k; ++j)
        line["top"].push_back({{"class", idx[r][j].item<int64_t>()}, {"name", name(idx[r][j].item<int64_t>())},
                               {"prob", p[r][j].item<double>()}});
      std::cout << json::dump(line) << "\n";  // a file name that is not UTF-8 gets U+FFFD
    } else {
      std::cout << files[i] << "\n";
      for (int64_t j = 0; j < k; ++j) {
        char buf[64];
        std::snprintf(buf, sizeof(buf), "  %2lld. %6.2f%%  ", static_cast<long long>(j + 1), 100.0 * p[r][j].item<double>());
        std::cout << buf << name(idx[r][j].item<int64_t>()) << " (" << idx[r][j].item<int64_t>() << ")\n";
      }
    }
  }
  return 0;
}

int cmd_predict(const po::variables_map& vm) {
  RunConfig rc = run_config_from(vm);
  if (vm.count("images") || vm.count("image-dir")) {
    if (vm.count("input")) throw UsageError("--input and --images/--image-dir exclude each other");
    return predict_images(vm, rc);
  }
  const std::string input_path = required(vm, "input"), out_path = required(vm, "out");
  const int64_t batch = vm["batch-size"].as<int64_t>();
  if (batch <= 0) throw UsageError("--batch-size=" + std::to_string(batch) + " must be positive");
  const std::string adapter_dir = vm.count("adapter") ? vm["adapter"].as<std::string>() : "";
  Mesh mesh = mesh_for(rc, *g_mpi, /*cpu=*/true);
  AdapterConfig adapter;
  StageModel sm = load_on_mesh(rc, adapter_dir, mesh, &adapter);

  CheckpointReader input(input_path);
  if (!input.contains("input")) throw std::runtime_error(input_path + ": no tensor named 'input'");
  const auto shape = input.shape("input");
  const auto& m = rc.model;
  if (shape.size() != 4 || shape[1] != m.in_chans || shape[2] != m.image_size || shape[3] != m.image_size)
    throw std::runtime_error(input_path + ": tensor 'input' has shape " + shape_str(shape) + ", the model needs [B, " +
                             std::to_string(m.in_chans) + ", " + std::to_string(m.image_size) + ", " +
                             std::to_string(m.image_size) + "]");
  torch::Tensor images = input.read("input", torch::kFloat32);

  // Through the pipeline stages; every dp replica computes all of it, rank 0 writes.
  torch::Tensor logits = mesh_logits(sm, mesh, images, batch, m.num_classes);
  if (mesh.rank != 0) return 0;
  save_tensors(out_path, {{"logits", logits}});
  spdlog::info("wrote logits {} to {}", shape_str(logits.sizes().vec()), out_path);

  if (input.contains("labels") && logits.size(0) > 0 && m.num_classes > 0) {
    torch::Tensor labels = input.read("labels", torch::kInt64);
    if (labels.dim() != 1 || labels.size(0) != logits.size(0))
      throw std::runtime_error(input_path + ": tensor 'labels' has shape " + shape_str(labels.sizes().vec()) +
                               ", expected [" + std::to_string(logits.size(0)) + "]");
    double top1 = logits.argmax(1).eq(labels).to(torch::kFloat64).mean().item<double>();
    spdlog::info("top-1 against the input's labels: {:.2f}% of {} images", 100.0 * top1, labels.size(0));
  }
  return 0;
}

// ---------------------------------------------------------------------------------------
// merge: backbone + adapter -> one plain timm-named backbone (head included).
int cmd_merge(const po::variables_map& vm) {
  RunConfig rc = run_config_from(vm);
  const std::string adapter_dir = required(vm, "adapter"), out = required(vm, "out");
  Mesh mesh = mesh_for(rc, *g_mpi, /*cpu=*/true);
  AdapterConfig adapter;
  StageModel m = load_on_mesh(rc, adapter_dir, mesh, &adapter);
  merge_peft(*m.model, adapter.peft.method);  // each rank folds the update into its own shards
  auto merged = gather_backbone(m, mesh);
  if (mesh.rank != 0) return 0;
  save_tensors(out, merged, {{"format", "pt"}, {"shardtune_config", to_ini(rc)}});
  spdlog::info("merged the {} adapter into {}", adapter.peft.method, out);
  return 0;
}


// Before any collective, every rank checks what it can without tensors: the PEFT method is
// known, its target patterns match modules of the model, and the checkpoint exists, parses
// and has every parameter's shape (from its header alone).
void preflight(const RunConfig& rc) {
  MethodRegistry::instance().get(rc.peft.method);
  if (rc.peft.method == "fact_tt" && rc.parallel.pp > 1)
    throw UsageError("peft.method=fact_tt shares U, V and C across all blocks, so it needs every block on one stage: "
                     "parallel.pp=" + std::to_string(rc.parallel.pp) + " must be 1");
  if (rc.peft.method == "full" && rc.parallel.tp > 1)
    throw UsageError("peft.method=full with parallel.tp=" + std::to_string(rc.parallel.tp) +
                     ": full fine-tuning trains the sharded weights themselves; use parallel.tp=1");
  if (rc.train.cache_backbone) {
    if (rc.peft.method != "linear" && rc.peft.method != "lst")
      throw UsageError("train.cache_backbone=true with peft.method=" + rc.peft.method +
                       ": the method trains parts of the backbone before the cached outputs (only linear and lst "
                       "leave the whole backbone frozen)");
    if (rc.data.transform == "timm_train")
      throw UsageError("train.cache_backbone=true with data.transform=timm_train: a random augmentation gives each "
                       "epoch other backbone outputs; use vtab or timm_eval, or leave the cache off");
    if (rc.parallel.pp > 1)
      throw UsageError("train.cache_backbone=true with parallel.pp=" + std::to_string(rc.parallel.pp) +
                       ": the cache needs the whole backbone on one stage (parallel.pp=1)");
    if (!(rc.train.cache_max_gb > 0)) {
      std::ostringstream v;
      v << rc.train.cache_max_gb;
      throw UsageError("train.cache_max_gb=" + v.str() + " must be positive");
    }
  }
  if (rc.peft.method == "lst") {  // the side stream's shape and ladders (side_config and side_block_set name the key)
    try {
      side_config(rc.model, rc.peft);
      side_block_set(rc.peft, rc.model.depth);
    } catch (const std::invalid_argument& e) {
      throw UsageError(e.what());
    }
  }
  if (!rc.peft.targets.empty()) {
    std::vector<std::string> modules;
    for (const auto& [name, _] : rc.model.parameter_shapes())
      if (name.rfind("blocks.", 0) == 0 && name.size() > 7 && name.compare(name.size() - 7, 7, ".weight") == 0)
        modules.push_back(name.substr(0, name.size() - 7));
    match_targets(modules, rc.peft.targets, rc.peft.exclude);
  }
  if (rc.checkpoint.empty()) return;
  CheckpointReader reader(rc.checkpoint);
  ShapeList expected;
  for (auto& [name, shape] : rc.model.parameter_shapes())
    if (rc.load_head || name.rfind("head.", 0) != 0) expected.emplace_back(name, shape);
  check_fits(expected, reader, "", rc.load_head ? "" : "head.");
}

int cmd_train(const po::variables_map& vm) {
  RunConfig rc = run_config_from(vm);
  if (!rc.peft.init_adapter.empty()) {  // the adapter's method and shape, its weights loaded at build
    const AdapterConfig adapter = read_adapter_config(rc.peft.init_adapter);
    check_adapter_fits(adapter, rc.model, rc.peft.init_adapter);
    rc.peft = peft_for_init(rc.peft, adapter);
    spdlog::info("peft.init_adapter: starting from the {} adapter in {}", rc.peft.method, rc.peft.init_adapter);
  }
  preflight(rc);
  Mesh mesh = mesh_for(rc, *g_mpi);
  set_graceful_stop(true);  // from here a stop signal means: finish the step, checkpoint, exit 0
  train(rc.spec(), mesh);
  return 0;
}

int cmd_eval(const po::variables_map& vm) {
  RunConfig rc = run_config_from(vm);
  const std::string adapter = required(vm, "adapter");
  const auto names = class_names_for(rc, adapter);
  if (!names.empty()) spdlog::info("classes: {} ... {}", names.front(), names.back());
  preflight(rc);
  Mesh mesh = mesh_for(rc, *g_mpi);
  evaluate_adapter(rc.spec(), adapter, mesh);
  return 0;
}

// ---------------------------------------------------------------------------------------
// plan: no MPI, no tensors; with parallel.tp/pp given, that mesh, else the smallest that fits.
int cmd_plan(const po::variables_map& vm) {
  RunConfig rc = run_config_from(vm);
  if (!vm.count("world-size")) throw UsageError("--world-size is required");
  PlanInput in;
  in.model = rc.model;
  in.peft = rc.peft;
  in.world = vm["world-size"].as<int>();
  if (in.world < 1) throw UsageError("--world-size=" + std::to_string(in.world) + " must be positive");
  in.tp = vm.count("parallel.tp") ? rc.parallel.tp : 0;
  in.pp = vm.count("parallel.pp") ? rc.parallel.pp : 0;
  in.global_batch = rc.data.batch_size;
  in.microbatches = rc.parallel.microbatches;
  in.schedule = rc.parallel.schedule;
  in.precision = rc.train.precision;
  in.device_memory_bytes = parse_bytes(vm["device-memory"].as<std::string>());
  std::vector<std::string> reasoning;
  PlanResult r = plan(in, &reasoning);
  if (!reasoning.empty()) {
    std::cout << "searching the smallest tp x pp that fits (tp first, within a node of 8):\n";
    for (const auto& line : reasoning) std::cout << "  " << line << "\n";
  }
  std::cout << format_plan(in, r);
  return 0;
}

// ---------------------------------------------------------------------------------------
// data: no MPI; the index of the data set, per-class counts, a decode check, a loader benchmark.
int cmd_data(const po::variables_map& vm) {
  RunConfig rc = run_config_from(vm);
  Splits s = load_splits(rc.data, rc.model);
  std::cout << describe(s, rc.data) << "\n";
  const std::vector<std::pair<const char*, const Dataset*>> splits = {{"train", &s.train}, {"val", &s.val}, {"test", &s.test}};
  std::printf("%-24s %8s %8s %8s\n", "class", "train", "val", "test");
  for (int64_t c = 0; c < s.train.num_classes; ++c) {
    const std::string name = c < static_cast<int64_t>(s.train.class_names.size()) ? s.train.class_names[static_cast<size_t>(c)] : std::to_string(c);
    std::printf("%-24s", name.c_str());
    for (const auto& [_, d] : splits) std::printf(" %8lld", static_cast<long long>(d->size() ? d->labels.eq(c).sum().item<int64_t>() : 0));
    std::printf("\n");
  }
  std::fflush(stdout);
  if (vm.count("check")) {
    int64_t checked = 0, bad = 0;
    for (const auto& [split, d] : splits)
      for (const auto& f : d->files) {
        ++checked;
        try {
          data::decode_file(f, static_cast<int>(rc.model.in_chans));
        } catch (const data::DecodeError& e) {
          ++bad;
          std::cout << "bad " << split << " image: " << e.what() << "\n";
        }
      }
    std::cout << "checked " << checked << " files: " << bad << " do not decode\n";
    if (bad > 0) return 1;
  }
  if (vm.count("benchmark")) {
    const int64_t n = vm["benchmark"].as<int64_t>();
    if (n <= 0) throw UsageError("--benchmark=" + std::to_string(n) + " must be positive");
    Prefetcher loader(s.train, rc.model, rc.data, 0, 1);
    loader.get(0);  // the first batch starts the threads and fills the queue: not timed
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t step = 1; step <= n; ++step) loader.get(step);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    nlohmann::json out{{"images_per_sec", static_cast<double>(n * rc.data.batch_size) / secs},
                       {"workers", loader.workers()}, {"batch_size", rc.data.batch_size},
                       {"batches", n}, {"transform", rc.data.transform}};
    std::cout << out.dump() << "\n";
  }
  return 0;
}

// One line, through the rank-aware logger once it exists; returns the exit code.
int fail(const char* command, const std::string& what, int code) {
  if (spdlog::get("shardtune")) {
    spdlog::error("shardtune {}: {}", command, what);
  } else {
    std::cerr << "shardtune " << command << ": error: " << what << "\n";
  }
  return code;
}

struct Command {
  const char* name;
  int (*run)(const po::variables_map&);
  po::options_description (*options)();
  bool uses_mpi;
};

po::options_description train_options() { return po::options_description("train options"); }

po::options_description plan_options() {
  po::options_description d("plan options");
  d.add_options()("world-size", po::value<int>(), "number of ranks")(
      "device-memory", po::value<std::string>()->default_value("80GB"), "memory of one device (80GB, 24GiB, ...)");
  return d;
}

po::options_description eval_options() {
  po::options_description d("eval options");
  d.add_options()("adapter", po::value<std::string>(), "adapter directory");
  return d;
}

po::options_description init_options() {
  po::options_description d("init options");
  d.add_options()("out", po::value<std::string>(), "output .safetensors file");
  return d;
}

po::options_description predict_options() {
  po::options_description d("predict options");
  d.add_options()("input", po::value<std::string>(), ".safetensors with 'input' [B,C,H,W] float32 (and optional 'labels' [B])")(
      "out", po::value<std::string>(), ".safetensors to write with 'logits' [B,num_classes] float32")(
      "batch-size", po::value<int64_t>()->default_value(32), "images per forward pass")(
      "adapter", po::value<std::string>(), "adapter directory (adapter_config.json + adapter_model.safetensors)")(
      "images", po::value<std::vector<std::string>>()->multitoken(), "image files (.jpg .jpeg .png): print their top-5 classes")(
      "image-dir", po::value<std::string>(), "every .jpg .jpeg .png of a folder, as --images")(
      "format", po::value<std::string>()->default_value("table"), "--images output: table | jsonl (one JSON line an image)");
  return d;
}

po::options_description data_options() {
  po::options_description d("data options");
  d.add_options()("check", "decode every file of every split; exit 1 naming each that does not")(
      "benchmark", po::value<int64_t>(), "time N training batches through the loader; print one JSON line");
  return d;
}

po::options_description merge_options() {
  po::options_description d("merge options");
  d.add_options()("adapter", po::value<std::string>(), "adapter directory")(
      "out", po::value<std::string>(), "merged backbone .safetensors to write");
  return d;
}

const Command kCommands[] = {
    {"init", cmd_init, init_options, false},
    {"predict", cmd_predict, predict_options, true},
    {"merge", cmd_merge, merge_options, true},
    {"train", cmd_train, train_options, true},
    {"eval", cmd_eval, eval_options, true},
    {"plan", cmd_plan, plan_options, false},
    {"data", cmd_data, data_options, false},
};

}  // namespace

int main(int argc, char** argv) {
  // Before MPI, LibTorch, OpenMP or oneDNN start a thread: every thread inherits the blocked
  // stop signals and only the signal thread receives them (common/signals.h says why).
  start_signal_thread();
  const LaunchEnv env = launch_env_from_environment();
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "--help" || args[0] == "-h" || args[0] == "help") {
    (args.empty() ? std::cerr : std::cout) << kUsage;
    return args.empty() ? 2 : 0;
  }
  const Command* cmd = nullptr;
  for (const auto& c : kCommands)
    if (args[0] == c.name) cmd = &c;
  if (!cmd) {
    std::cerr << "shardtune: unknown command '" << args[0] << "'\n" << kUsage;
    return 2;
  }
  args.erase(args.begin());

  std::unique_ptr<MpiRuntime> mpi;
  int code = 0;
  std::string message;
  try {
    po::options_description options = common_options();
    options.add(cmd->options());
    po::variables_map vm;
    parse_command_line(args, options, vm);
    if (vm.count("help")) {
      std::cout << "usage: shardtune " << cmd->name << " [options]\n\n" << options << "\n" << config_key_options();
      return 0;
    }
    if (cmd->uses_mpi) {
      mpi = std::make_unique<MpiRuntime>(&argc, &argv);
      g_mpi = mpi.get();
    }
    init_logging(mpi ? mpi->rank() : env.rank, vm["log-level"].as<std::string>());
    configure_runtime(env.local_size);
    return cmd->run(vm);
  } catch (const UsageError& e) {
    code = 2, message = e.what();
  } catch (const std::invalid_argument& e) {
    code = 2, message = e.what();
  } catch (const c10::Error& e) {
    code = 1, message = e.what_without_backtrace();
  } catch (const std::exception& e) {
    code = 1, message = e.what();
  }
  fail(cmd->name, message, code);
  // Under MPI the other ranks may be waiting in a collective for this one: end the job.
  if (mpi && mpi->world_size() > 1) MpiRuntime::abort_job(code);
  return code;
}
