// In-process A/B of the frozen-backbone LoRA training step (issue 8): one ViT, one batch,
// the step run under each variant in turn (A B C A B C ...), so slow phases of a shared
// machine hit every variant alike. Variants give the model other operators (ops/ops.h, set_ops):
//   auto     train.frozen_gemm auto, the default: per GEMM shape the fastest exact kernel,
//            measured at its first call (in round 0, untimed) or read from the cache
//   onednn   train.frozen_gemm onednn (fp32: oneDNN inner-product kernels; bf16: one mm, the
//            bias added in place, only the weight saved for backward)
//   blas     train.frozen_gemm blas: torch::linear, as the Python twin calls it
//   onednn_matmul  train.frozen_gemm onednn_matmul (oneDNN's matmul primitive on plain memory,
//            attention's products too)
//   X-nokernels  X with the AVX-512 kernels (softmax, LayerNorm, GELU, bias and residual adds)
//            off, i.e. train.bf16_kernels=false: LibTorch's own ops there
//   X-fp32kernels  a forced X with those kernels on for fp32 tensors too (auto times them)
// Prints per variant the best and the median step time (ms). The variants take turns training
// one model (one optimizer), so their losses are one run's, not comparable per variant.
//
//   cmake --build build --target shardtune_step_ab
//   OMP_NUM_THREADS=2 build/shardtune_step_ab [arch=vit_base_patch16_224] [precision=bf16]
//                                             [batch=8] [rounds=8] [variants=auto,onednn,blas]
//                                             [mode=step|infer]
// mode=infer times the eval forward instead (model.eval(), no autograd, logits of `batch`
// images), what `shardtune eval` and `predict` run; it prints images/s too.
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "common/runtime.h"
#include "models/vit.h"
#include "models/vit_config.h"
#include "peft/method.h"

using namespace shardtune;


int main(int argc, char** argv) {
  std::map<std::string, std::string> arg{{"arch", "vit_base_patch16_224"}, {"precision", "bf16"}, {"batch", "8"},
                                         {"rounds", "8"}, {"variants", "auto,onednn,blas"},
                                         {"mode", "step"}};
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto eq = a.find('=');
    if (eq == std::string::npos || !arg.count(a.substr(0, eq))) {
      std::fprintf(stderr, "usage: %s [arch=A] [precision=fp32|bf16] [batch=B] [rounds=R] [variants=a,b] [mode=step|infer]\n", argv[0]);
      return 2;
    }
    arg[a.substr(0, eq)] = a.substr(eq + 1);
  }
  configure_runtime();  // the malloc tuning and threads shardtune itself runs with
  const bool bf16 = arg["precision"] == "bf16";
  const int64_t batch = std::stoll(arg["batch"]), rounds = std::stoll(arg["rounds"]);
  std::vector<std::string> variants;
  std::stringstream ss(arg["variants"]);
  for (std::string v; std::getline(ss, v, ',');) variants.push_back(v);

  ViTConfig c = vit_preset(arg["arch"]);
  c.num_classes = 10;
  torch::manual_seed(0);
  VisionTransformer model(c);
  PeftConfig p;
  p.method = "lora";
  PeftState state = apply_peft(*model, p);
  if (bf16) cast_frozen(*model, torch::kBFloat16);
  std::vector<torch::Tensor> params;
  for (auto& [_, t] : state.trainable) params.push_back(t);
  torch::optim::AdamW opt(params, torch::optim::AdamWOptions(1e-4));
  torch::Tensor images = torch::randn({batch, c.in_chans, c.image_size, c.image_size});
  if (bf16) images = images.to(torch::kBFloat16);
  torch::Tensor labels = torch::randint(0, 10, {batch});
  reuse_large_blocks();  // as shardtune does once its model is loaded

  std::map<std::string, std::shared_ptr<const ops::Ops>> ops_of;
  for (const auto& v : variants) {
    auto strip = [](std::string& name, const std::string& suffix) {
      const bool has = name.size() > suffix.size() &&
                       name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
      if (has) name.resize(name.size() - suffix.size());
      return has;
    };
    std::string base = v;
    const bool off = strip(base, "-nokernels"), fp32 = strip(base, "-fp32kernels");
    ops::CpuOptions o;
    o.frozen_gemm = ops::parse_frozen_gemm(base);
    o.bf16_kernels = !off;
    o.fp32_kernels = fp32;
    ops_of[v] = ops::make_cpu_ops(o);
  }
  auto apply = [&](const std::string& v) { set_ops(*model, ops_of.at(v)); };
  const bool infer = arg["mode"] == "infer";
  if (infer) model->eval();
  std::map<std::string, std::vector<double>> ms;
  for (int64_t r = 0; r <= rounds; ++r) {  // round 0 warms every variant up, untimed
    for (const auto& v : variants) {
      apply(v);
      auto t0 = std::chrono::steady_clock::now();
      if (infer) {
        torch::NoGradGuard no_grad;
        torch::Tensor logits = model->forward(images);
        const double dt = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
        if (r > 0) ms[v].push_back(dt);
        if (!std::isfinite(logits.to(torch::kFloat).sum().item<double>())) return 1;
        continue;
      }
      opt.zero_grad();
      torch::Tensor l = torch::cross_entropy_loss(model->forward(images).to(torch::kFloat), labels);
      l.backward();
      opt.step();
      double dt = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      if (r > 0) ms[v].push_back(dt);
      if (!std::isfinite(l.item<double>())) {
        std::fprintf(stderr, "variant %s: loss %f is not finite\n", v.c_str(), l.item<double>());
        return 1;
      }
    }
  }
  std::printf("# %s %s batch %lld, %lld rounds, %d threads\n", arg["arch"].c_str(), arg["precision"].c_str(),
              static_cast<long long>(batch), static_cast<long long>(rounds), torch::get_num_threads());
  std::printf("# mode %s\n| variant | best | median | images/s (median) |\n|---|---|---|---|\n", arg["mode"].c_str());
  for (const auto& v : variants) {
    auto t = ms[v];
    std::sort(t.begin(), t.end());
    std::printf("| %s | %.1f ms | %.1f ms | %.1f |\n", v.c_str(), t.front(), t[t.size() / 2],
                1e3 * static_cast<double>(batch) / t[t.size() / 2]);
  }
  for (const auto& v : variants) {
    const auto report = ops_of.at(v)->report();
    if (report.contains("choices")) {
      std::printf("\n%s: kernel choices (measured in %.2f s)\n", v.c_str(), report.value("tuning_s", 0.0));
      for (const auto& [key, c] : report["choices"].items()) {
        std::string times;  // each candidate's median call, as measured (or read from the cache)
        for (const auto& [name, us] : c["us"].items()) times += " " + name + " " + std::to_string(us.get<int64_t>()) + " us";
        std::printf("  %-48s %-14s%s\n", key.c_str(), c["pick"].get<std::string>().c_str(), times.c_str());
      }
    }
  }
  return 0;
}
