#include "launch/config.h"

#include <boost/program_options/parsers.hpp>
#include <boost/program_options/value_semantic.hpp>

#include <fstream>
#include <sstream>

namespace shardtune {

namespace po = boost::program_options;

po::options_description config_key_options() {
  po::options_description d("Config keys (INI [section] key = value, or --section.key VALUE)");
  // clang-format off
  d.add_options()
    ("model.arch", po::value<std::string>(), "preset (vit_tiny_patch16_224 ... vit_22b) or 'vit' for explicit dims")
    ("model.checkpoint", po::value<std::string>(), "backbone: .safetensors, model.safetensors.index.json or a directory")
    ("model.num_classes", po::value<int64_t>(), "classifier outputs (0: no head)")
    ("model.image_size", po::value<int64_t>(), "input height = width, pixels")
    ("model.in_chans", po::value<int64_t>(), "input channels")
    ("model.patch_size", po::value<int64_t>(), "patch height = width")
    ("model.dim", po::value<int64_t>(), "token width")
    ("model.depth", po::value<int64_t>(), "number of blocks")
    ("model.heads", po::value<int64_t>(), "attention heads")
    ("model.mlp_dim", po::value<int64_t>(), "MLP hidden width")
    ("model.qkv_bias", po::value<bool>(), "bias on attn.qkv (true|false)")
    ("model.global_pool", po::value<std::string>(), "token | avg")
    ("model.layer_scale", po::value<double>(), "layer-scale init value, 0 = none")
    ("model.qk_norm", po::value<bool>(), "LayerNorm on q and k (true|false)")
    ("peft.method", po::value<std::string>(), "lora adapter adaptformer vpt_shallow vpt_deep prefix bitfit ln_tune ssf fact_tt lst linear full none")
    ("peft.targets", po::value<std::string>(), "modules: 'a,b' (exact or .suffix) or 're:<regex>'; default per method")
    ("peft.exclude", po::value<std::string>(), "modules to leave out, same syntax")
    ("peft.qkv_parts", po::value<std::string>(), "LoRA on fused attn.qkv: parts among q,k,v (default q,v)")
    ("peft.rank", po::value<int64_t>(), "LoRA / FacT rank (default 8)")
    ("peft.alpha", po::value<double>(), "LoRA alpha; scaling = alpha / rank (default 8)")
    ("peft.rank_pattern", po::value<std::string>(), "LoRA rank per module, as PEFT's rank_pattern: 'attn.qkv:16,mlp.fc1:4'")
    ("peft.alpha_pattern", po::value<std::string>(), "LoRA alpha per module, as PEFT's alpha_pattern: 'attn.qkv:32'")
    ("peft.rslora", po::value<bool>(), "rank-stabilised LoRA: scaling = alpha / sqrt(rank) (default false)")
    ("peft.init_adapter", po::value<std::string>(), "train: start from this adapter directory (ShardTune's or a Hugging Face PEFT LoRA)")
    ("peft.dropout", po::value<double>(), "LoRA input dropout (default 0)")
    ("peft.bottleneck", po::value<int64_t>(), "adapter / adaptformer width (default 8)")
    ("peft.prompt_len", po::value<int64_t>(), "VPT / prefix tokens (default 10)")
    ("peft.scale", po::value<double>(), "adaptformer output scale (0.1) / FacT scale (1)")
    ("peft.train_head", po::value<bool>(), "train the classifier head (default true)")
    ("peft.side_blocks", po::value<std::string>(), "lst: blocks whose output feeds the side stream, '0,2,4' or '6-11' (default: every block)")
    ("peft.side_reduction", po::value<int64_t>(), "lst: side stream width = model.dim / this (default 8)")
    ("model.load_head", po::value<bool>(), "load the checkpoint's head (false: a new task's head, freshly initialised)")
    ("data.dataset", po::value<std::string>(), "fashion_mnist | synthetic | imagefolder | filelist")
    ("data.root", po::value<std::string>(), "folder of the IDX files (default /usr/share/datasets/fashion-mnist), or of "
                                            "train/ val/ test/ class folders (imagefolder), or the list files' paths (filelist)")
    ("data.train_list", po::value<std::string>(), "filelist: 'relative/path label' lines (e.g. train800.txt), under data.root")
    ("data.val_list", po::value<std::string>(), "filelist: validation list (optional; else data.val_samples held out)")
    ("data.test_list", po::value<std::string>(), "filelist: test list (e.g. test.txt)")
    ("data.transform", po::value<std::string>(), "image files: vtab (resize) | timm_eval (short side to size/crop_pct, centre crop) | "
                                                 "timm_train (RandomResizedCrop + flip; evaluates as timm_eval)")
    ("data.interpolation", po::value<std::string>(), "bilinear | bicubic (antialiased when shrinking)")
    ("data.crop_pct", po::value<double>(), "timm_eval crop fraction (default 0.875)")
    ("data.bad_images", po::value<std::string>(), "error (default) | skip: a file that does not decode is replaced by the next of its class")
    ("data.workers", po::value<int>(), "decode threads (default 0: the cores left after the compute threads, at least 1)")
    ("data.prefetch", po::value<int>(), "ready batches queued ahead (default 2)")
    ("data.classes", po::value<std::string>(), "class subset, renumbered: '5-9', '0,2,4' (default all)")
    ("data.train_samples", po::value<int64_t>(), "training images (0: all of the classes')")
    ("data.val_samples", po::value<int64_t>(), "validation images held out of the training file")
    ("data.eval_samples", po::value<int64_t>(), "test images to evaluate (0: all)")
    ("data.batch_size", po::value<int64_t>(), "global batch size")
    ("data.seed", po::value<uint64_t>(), "seed of the split and the batch order")
    ("data.mean", po::value<std::string>(), "normalisation mean: one value or one a channel 'a,b,c' (default ImageNet's for "
                                            "3 channels, Fashion-MNIST's 0.2860 for it and for 1)")
    ("data.std", po::value<std::string>(), "normalisation std, as data.mean (0.229,0.224,0.225 or 0.3530)")
    ("train.seed", po::value<uint64_t>(), "seed for initialisation")
    ("train.steps", po::value<int64_t>(), "optimizer steps")
    ("train.epochs", po::value<int64_t>(), "epochs (overrides steps when > 0)")
    ("train.lr", po::value<double>(), "peak learning rate")
    ("train.weight_decay", po::value<double>(), "AdamW weight decay")
    ("train.beta1", po::value<double>(), "AdamW beta1")
    ("train.beta2", po::value<double>(), "AdamW beta2")
    ("train.warmup_steps", po::value<int64_t>(), "linear warm-up steps before the cosine decay")
    ("train.grad_clip", po::value<double>(), "clip the global gradient norm (0: off)")
    ("train.label_smoothing", po::value<double>(), "cross-entropy label smoothing")
    ("train.precision", po::value<std::string>(), "fp32 | bf16 (frozen weights stored in bf16, trainable ones fp32)")
    ("train.frozen_gemm", po::value<std::string>(), "GEMM kernels on CPU: auto (default: the fastest exact kernel per shape, measured at its first call and cached per host) | onednn (fp32: oneDNN's inner product; bf16: one mm) | onednn_matmul (oneDNN's matmul on plain memory, attention too) | blas (torch::linear)")
    ("train.bf16_kernels", po::value<bool>(), "bf16 softmax, LayerNorm, GELU, bias and residual adds by ShardTune's AVX-512 kernels where the CPU has AVX-512 BF16 (default true; under auto each timed against LibTorch's op; false: LibTorch's ops)")
    ("train.cache_backbone", po::value<bool>(), "keep each training image's frozen-backbone output (linear: features; lst: ladder inputs) from its first use and skip the backbone after (default false; needs a deterministic data.transform)")
    ("train.cache_max_gb", po::value<double>(), "train.cache_backbone: the most memory the cache may take per rank, GB (default 8)")
    ("train.kernel_cache", po::value<std::string>(), "directory of train.frozen_gemm=auto's measurements (default $XDG_CACHE_HOME/shardtune or ~/.cache/shardtune; - : none, measure every run)")
    ("train.eval_every", po::value<int64_t>(), "evaluate every N steps (0: at the end only)")
    ("train.log_every", po::value<int64_t>(), "log every N steps")
    ("train.exit_interval", po::value<int64_t>(), "stop after N steps of this run, with a checkpoint")
    ("train.profile_step", po::value<int64_t>(), "record step N's op profile (chrome trace) in output.dir (0: off)")
    ("output.dir", po::value<std::string>(), "output folder")
    ("output.checkpoint_every", po::value<int64_t>(), "checkpoint every N steps (0: only when stopping early)")
    ("output.keep", po::value<int64_t>(), "newest checkpoints kept")
    ("output.resume", po::value<std::string>(), "auto | never | a checkpoints/step_N folder")
    ("parallel.tp", po::value<int>(), "tensor-parallel degree")
    ("parallel.pp", po::value<int>(), "pipeline stages")
    ("parallel.microbatches", po::value<int64_t>(), "micro-batches per step")
    ("parallel.schedule", po::value<std::string>(), "pipeline schedule: gpipe | 1f1b")
    ("parallel.bucket_mb", po::value<double>(), "gradient-sync bucket size, MB")
    ("parallel.device", po::value<std::string>(), "auto (cuda when LibTorch has CUDA and a GPU is visible) | cpu | cuda; one GPU per rank")
    ("parallel.backend", po::value<std::string>(), "collectives: auto (nccl on cuda, mpi on cpu) | mpi | nccl (libnccl.so.2, loaded at run time)");
  // clang-format on
  return d;
}

void parse_command_line(const std::vector<std::string>& args, const po::options_description& command_options,
                        po::variables_map& vm) {
  po::options_description keys = config_key_options();
  po::options_description all;
  all.add(command_options).add(keys);
  try {
    po::store(po::command_line_parser(args).options(all).run(), vm);
  } catch (const po::error& e) {
    throw UsageError(e.what());
  }
  if (vm.count("config")) {
    const std::string file = vm["config"].as<std::string>();
    std::ifstream in(file);
    if (!in) throw UsageError("--config " + file + ": cannot open the file");
    try {
      po::store(po::parse_config_file(in, keys, /*allow_unregistered=*/false), vm);  // the command line wins
    } catch (const po::error& e) {
      throw UsageError(file + ": " + e.what());
    }
  }
  try {
    po::notify(vm);
  } catch (const po::error& e) {
    throw UsageError(e.what());
  }
}

RunConfig run_config_from(const po::variables_map& vm) {
  RunConfig rc;
  auto has = [&](const char* k) { return vm.count(k) > 0; };
  std::string arch = has("model.arch") ? vm["model.arch"].as<std::string>() : "vit";
  try {
    rc.model = arch == "vit" ? ViTConfig{} : vit_preset(arch);
  } catch (const std::invalid_argument& e) {
    throw UsageError(e.what());
  }
  rc.model.arch = arch;
  auto set_i = [&](const char* k, int64_t& field) {
    if (has(k)) field = vm[k].as<int64_t>();
  };
  set_i("model.num_classes", rc.model.num_classes);
  set_i("model.image_size", rc.model.image_size);
  set_i("model.in_chans", rc.model.in_chans);
  set_i("model.patch_size", rc.model.patch_size);
  set_i("model.dim", rc.model.dim);
  set_i("model.depth", rc.model.depth);
  set_i("model.heads", rc.model.heads);
  set_i("model.mlp_dim", rc.model.mlp_dim);
  if (has("model.qkv_bias")) rc.model.qkv_bias = vm["model.qkv_bias"].as<bool>();
  if (has("model.global_pool")) rc.model.global_pool = vm["model.global_pool"].as<std::string>();
  if (has("model.layer_scale")) rc.model.layer_scale = vm["model.layer_scale"].as<double>();
  if (has("model.qk_norm")) rc.model.qk_norm = vm["model.qk_norm"].as<bool>();
  if (has("model.checkpoint")) rc.checkpoint = vm["model.checkpoint"].as<std::string>();
  if (has("train.seed")) rc.seed = vm["train.seed"].as<uint64_t>();
  auto str = [&](const char* k, std::string& field) {
    if (has(k)) field = vm[k].as<std::string>();
  };
  str("peft.method", rc.peft.method);
  str("peft.targets", rc.peft.targets);
  str("peft.exclude", rc.peft.exclude);
  str("peft.qkv_parts", rc.peft.qkv_parts);
  set_i("peft.rank", rc.peft.rank);
  set_i("peft.bottleneck", rc.peft.bottleneck);
  set_i("peft.prompt_len", rc.peft.prompt_len);
  if (has("peft.alpha")) rc.peft.alpha = vm["peft.alpha"].as<double>();
  if (has("peft.dropout")) rc.peft.dropout = vm["peft.dropout"].as<double>();
  if (has("peft.scale")) rc.peft.scale = vm["peft.scale"].as<double>();
  if (has("peft.train_head")) rc.peft.train_head = vm["peft.train_head"].as<bool>();
  if (has("peft.rslora")) rc.peft.rslora = vm["peft.rslora"].as<bool>();
  str("peft.init_adapter", rc.peft.init_adapter);
  str("peft.side_blocks", rc.peft.side_blocks);
  set_i("peft.side_reduction", rc.peft.side_reduction);
  auto patterns = [&](const char* k, auto& field, auto parse) {
    if (!has(k)) return;
    field.clear();
    const std::string text = vm[k].as<std::string>();
    try {
      for (const auto& [pattern, value] : split_pairs(text, k)) {
        size_t used = 0;
        auto v = parse(value, &used);
        if (used != value.size()) throw std::invalid_argument(value);
        field.emplace_back(pattern, v);
      }
    } catch (const std::exception& e) {
      throw UsageError(std::string(k) + "=" + text + ": not PATTERN:NUMBER items (" + e.what() + ")");
    }
  };
  patterns("peft.rank_pattern", rc.peft.rank_pattern, [](const std::string& v, size_t* used) { return std::stoll(v, used); });
  patterns("peft.alpha_pattern", rc.peft.alpha_pattern, [](const std::string& v, size_t* used) { return std::stod(v, used); });
  if (has("model.load_head")) rc.load_head = vm["model.load_head"].as<bool>();
  auto set_d = [&](const char* k, double& field) {
    if (has(k)) field = vm[k].as<double>();
  };
  str("data.dataset", rc.data.dataset);
  str("data.root", rc.data.root);
  str("data.classes", rc.data.classes);
  set_i("data.train_samples", rc.data.train_samples);
  set_i("data.val_samples", rc.data.val_samples);
  set_i("data.eval_samples", rc.data.eval_samples);
  set_i("data.batch_size", rc.data.batch_size);
  if (has("data.seed")) rc.data.seed = vm["data.seed"].as<uint64_t>();
  str("data.train_list", rc.data.train_list);
  str("data.val_list", rc.data.val_list);
  str("data.test_list", rc.data.test_list);
  str("data.transform", rc.data.transform);
  str("data.interpolation", rc.data.interpolation);
  set_d("data.crop_pct", rc.data.crop_pct);
  str("data.bad_images", rc.data.bad_images);
  if (has("data.workers")) rc.data.workers = vm["data.workers"].as<int>();
  if (has("data.prefetch")) rc.data.prefetch = vm["data.prefetch"].as<int>();
  auto list_d = [&](const char* k, std::vector<double>& field) {
    if (!has(k)) return;
    field.clear();
    for (const auto& item : split_list(vm[k].as<std::string>())) {
      try {
        size_t used = 0;
        field.push_back(std::stod(item, &used));
        if (used != item.size()) throw std::invalid_argument(item);
      } catch (const std::exception&) {
        throw UsageError(std::string(k) + "=" + vm[k].as<std::string>() + ": '" + item + "' is not a number");
      }
    }
  };
  list_d("data.mean", rc.data.mean);
  list_d("data.std", rc.data.std);
  set_i("train.steps", rc.train.steps);
  set_i("train.epochs", rc.train.epochs);
  set_d("train.lr", rc.train.lr);
  set_d("train.weight_decay", rc.train.weight_decay);
  set_d("train.beta1", rc.train.beta1);
  set_d("train.beta2", rc.train.beta2);
  set_i("train.warmup_steps", rc.train.warmup_steps);
  set_d("train.grad_clip", rc.train.grad_clip);
  set_d("train.label_smoothing", rc.train.label_smoothing);
  str("train.precision", rc.train.precision);
  set_i("train.eval_every", rc.train.eval_every);
  set_i("train.log_every", rc.train.log_every);
  set_i("train.exit_interval", rc.train.exit_interval);
  set_i("train.profile_step", rc.train.profile_step);
  str("train.frozen_gemm", rc.train.frozen_gemm);
  if (rc.train.frozen_gemm != "auto" && rc.train.frozen_gemm != "onednn" && rc.train.frozen_gemm != "onednn_matmul" &&
      rc.train.frozen_gemm != "blas")
    throw UsageError("train.frozen_gemm=" + rc.train.frozen_gemm + " must be auto, onednn, onednn_matmul or blas");
  if (has("train.bf16_kernels")) rc.train.bf16_kernels = vm["train.bf16_kernels"].as<bool>();
  str("train.kernel_cache", rc.train.kernel_cache);
  if (has("train.cache_backbone")) rc.train.cache_backbone = vm["train.cache_backbone"].as<bool>();
  if (has("train.cache_max_gb")) rc.train.cache_max_gb = vm["train.cache_max_gb"].as<double>();
  str("output.dir", rc.output.dir);
  set_i("output.checkpoint_every", rc.output.checkpoint_every);
  set_i("output.keep", rc.output.keep);
  str("output.resume", rc.output.resume);
  if (has("parallel.tp")) rc.parallel.tp = vm["parallel.tp"].as<int>();
  if (has("parallel.pp")) rc.parallel.pp = vm["parallel.pp"].as<int>();
  set_i("parallel.microbatches", rc.parallel.microbatches);
  str("parallel.schedule", rc.parallel.schedule);
  if (rc.parallel.schedule != "gpipe" && rc.parallel.schedule != "1f1b")
    throw UsageError("parallel.schedule=" + rc.parallel.schedule + " must be gpipe or 1f1b");
  set_d("parallel.bucket_mb", rc.parallel.bucket_mb);
  str("parallel.device", rc.parallel.device);
  str("parallel.backend", rc.parallel.backend);
  if (rc.parallel.device != "auto" && rc.parallel.device != "cpu" && rc.parallel.device != "cuda")
    throw UsageError("parallel.device=" + rc.parallel.device + " is not one of auto, cpu, cuda");
  if (rc.parallel.backend != "auto" && rc.parallel.backend != "mpi" && rc.parallel.backend != "nccl")
    throw UsageError("parallel.backend=" + rc.parallel.backend + " is not one of auto, mpi, nccl");
  rc.train.seed = rc.seed;
  if (rc.train.steps <= 0 && rc.train.epochs <= 0)
    throw UsageError("train.steps=" + std::to_string(rc.train.steps) + " must be positive (or set train.epochs)");
  if (rc.train.lr <= 0) throw UsageError("train.lr=" + std::to_string(rc.train.lr) + " must be positive");
  if (rc.train.precision != "fp32" && rc.train.precision != "bf16")
    throw UsageError("train.precision=" + rc.train.precision + " must be fp32 or bf16");
  if (rc.train.profile_step < 0)
    throw UsageError("train.profile_step=" + std::to_string(rc.train.profile_step) + " must be 0 (off) or a step");
  if (rc.output.resume.empty()) throw UsageError("output.resume is empty (auto, never or a checkpoint folder)");
  try {
    rc.model.validate();
  } catch (const std::invalid_argument& e) {
    throw UsageError(e.what());
  }
  return rc;
}

RunSpec RunConfig::spec() const {
  RunSpec s;
  s.model = model;
  s.checkpoint = checkpoint;
  s.load_head = load_head;
  s.peft = peft;
  s.data = data;
  s.train = train;
  s.output = output;
  s.bucket_mb = parallel.bucket_mb;
  s.microbatches = parallel.microbatches;
  s.schedule = parallel.schedule;
  return s;
}

std::string to_ini(const RunConfig& c) {
  std::ostringstream s;
  const ViTConfig& m = c.model;
  s << "[model]\narch = " << m.arch << "\nimage_size = " << m.image_size << "\nin_chans = " << m.in_chans
    << "\npatch_size = " << m.patch_size << "\ndim = " << m.dim << "\ndepth = " << m.depth << "\nheads = " << m.heads
    << "\nmlp_dim = " << m.mlp_dim << "\nnum_classes = " << m.num_classes
    << "\nqkv_bias = " << (m.qkv_bias ? "true" : "false") << "\nglobal_pool = " << m.global_pool
    << "\nlayer_scale = " << m.layer_scale << "\nqk_norm = " << (m.qk_norm ? "true" : "false") << "\n";
  if (!c.checkpoint.empty()) s << "checkpoint = " << c.checkpoint << "\n";
  const PeftConfig& p = c.peft;
  s << "\n[peft]\nmethod = " << p.method << "\n";
  if (!p.targets.empty()) s << "targets = " << p.targets << "\n";
  if (!p.exclude.empty()) s << "exclude = " << p.exclude << "\n";
  s << "qkv_parts = " << p.qkv_parts << "\nrank = " << p.rank << "\nalpha = " << p.alpha << "\ndropout = " << p.dropout
    << "\nbottleneck = " << p.bottleneck << "\nprompt_len = " << p.prompt_len << "\n";
  if (p.scale) s << "scale = " << *p.scale << "\n";
  s << "train_head = " << (p.train_head ? "true" : "false") << "\n";
  s << "\n[train]\nseed = " << c.seed << "\n";
  return s.str();
}

}  // namespace shardtune
