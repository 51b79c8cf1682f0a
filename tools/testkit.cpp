// shardtune_testkit: small helpers that make inputs for the main job and the CLI tests.
//   make-input IMAGES.idx[.gz] LABELS.idx[.gz] N SIZE CHANS MEAN,STD OUT.safetensors
//       the first N images as `predict` input: input [N, C, S, S] float32 (bilinear resize,
//       grey repeated to C channels, (x/255 - mean) / std) and labels [N] int64
//   make-adapter CONFIG.ini METHOD DIR SEED
//       an adapter of METHOD for the config's model, its parameters moved off their
//       initial values by N(0, 0.1) noise (so it changes the logits), saved as a trained one
//   compare A.safetensors B.safetensors TENSOR RTOL
//       exit 0 when max |a - b| / max |b| over TENSOR ("*": every tensor, per tensor) is
//       within RTOL, else 1
#include <torch/torch.h>

#include <boost/program_options/options_description.hpp>
#include <boost/program_options/value_semantic.hpp>
#include <boost/program_options/variables_map.hpp>
#include <iostream>
#include <string>

#include "io/idx.h"
#include "launch/config.h"
#include "models/checkpoint.h"
#include "models/vit.h"
#include "peft/adapter_io.h"
#include "peft/method.h"

using namespace shardtune;

namespace {

int make_input(char** a) {
  auto images = io::read_idx_u8(a[0]);
  auto labels = io::read_idx_u8(a[1]);
  const int64_t n = std::stoll(a[2]), size = std::stoll(a[3]), chans = std::stoll(a[4]);
  const std::string norm = a[5];
  const double mean = std::stod(norm.substr(0, norm.find(','))), std = std::stod(norm.substr(norm.find(',') + 1));
  if (images.dims.size() != 3 || labels.dims.size() != 1 || images.dims[0] != labels.dims[0])
    throw std::runtime_error("images must be [N, H, W] and labels [N] of the same N");
  if (n <= 0 || n > images.dims[0])
    throw std::runtime_error("N=" + std::to_string(n) + " must be in [1, " + std::to_string(images.dims[0]) + "]");
  const int64_t h = images.dims[1], w = images.dims[2];
  torch::Tensor x = torch::from_blob(images.data.data(), {n, 1, h, w}, torch::kUInt8).to(torch::kFloat32) / 255.0;
  if (size != h || size != w)
    x = torch::nn::functional::interpolate(x, torch::nn::functional::InterpolateFuncOptions()
                                                  .size(std::vector<int64_t>{size, size})
                                                  .mode(torch::kBilinear)
                                                  .align_corners(false));
  x = ((x - mean) / std).expand({n, chans, size, size}).contiguous();
  torch::Tensor y = torch::from_blob(labels.data.data(), {n}, torch::kUInt8).to(torch::kInt64);
  save_tensors(a[6], {{"input", x}, {"labels", y}});
  std::cout << "wrote " << n << " images [" << chans << ", " << size << ", " << size << "] to " << a[6] << "\n";
  return 0;
}

int make_adapter(char** a) {
  namespace po = boost::program_options;
  po::options_description opts;
  opts.add_options()("config", po::value<std::string>());
  po::variables_map vm;
  parse_command_line({"--config", a[0], "--peft.method", a[1]}, opts, vm);
  RunConfig rc = run_config_from(vm);
  torch::manual_seed(std::stoull(a[3]));
  VisionTransformer model(rc.model);
  PeftState state = apply_peft(*model, rc.peft);
  {
    torch::NoGradGuard g;
    for (const auto& [_, t] : state.trainable) t.add_(torch::randn_like(t) * 0.1);
  }
  save_adapter(a[2], state, rc.peft, rc.model);
  std::cout << "wrote a " << rc.peft.method << " adapter (" << state.trainable_count() << " parameters) to " << a[2]
            << "\n";
  return 0;
}

int compare(char** a) {
  CheckpointReader ra(a[0]), rb(a[1]);
  const std::string which = a[2];
  const double tol = std::stod(a[3]);
  if (which == "*" && ra.names() != rb.names()) {
    std::cout << "the files hold different tensors\n";
    return 1;
  }
  double worst = 0;
  for (const auto& name : which == "*" ? ra.names() : std::vector<std::string>{which}) {
    torch::Tensor x = ra.read(name, torch::kFloat64), y = rb.read(name, torch::kFloat64);
    if (x.sizes() != y.sizes()) {
      std::cout << name << ": shapes differ: " << shape_str(x.sizes().vec()) << " vs " << shape_str(y.sizes().vec()) << "\n";
      return 1;
    }
    if (x.numel() == 0) continue;
    worst = std::max(worst, ((x - y).abs().max() / y.abs().max().clamp_min(1e-12)).item<double>());
  }
  std::cout << "max relative difference of '" << which << "': " << worst << (worst <= tol ? " <= " : " > ") << tol << "\n";
  return worst <= tol ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string cmd = argc > 1 ? argv[1] : "";
  try {
    if (cmd == "make-input" && argc == 9) return make_input(argv + 2);
    if (cmd == "make-adapter" && argc == 6) return make_adapter(argv + 2);
    if (cmd == "compare" && argc == 6) return compare(argv + 2);
  } catch (const std::exception& e) {
    std::cerr << "shardtune_testkit " << cmd << ": error: " << e.what() << "\n";
    return 1;
  }
  std::cerr << "usage: shardtune_testkit make-input IMAGES LABELS N SIZE CHANS MEAN,STD OUT\n"
               "       shardtune_testkit make-adapter CONFIG.ini METHOD DIR SEED\n"
               "       shardtune_testkit compare A.safetensors B.safetensors TENSOR RTOL\n";
  return 2;
}
