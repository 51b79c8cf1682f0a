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
//   image-folder IDX_ROOT OUT N_TRAIN N_TEST
//       the first N_TRAIN training and N_TEST test images of a Fashion-MNIST IDX folder, ordered
//       by label (stable), twice: as PNGs in OUT/png/{train,test}/<k>_<name>/<i>.png (with
//       OUT/png/{train,test}.txt list files of the same order) and as IDX files in OUT/idx
//   make-peft-lora, peft-merge: tools/peft_reference.cpp
//   transform FILE KIND INTERP SIZE CHANS OUT.f32
//       FILE decoded and put through data.transform KIND (mean 0, std 1; timm_train with
//       seed 0) as raw float32 [C, SIZE, SIZE]; `decode` as KIND: the decoded bytes [H, W, C];
//       prints the shape; more groups of the six may follow
//   matmul-peak
//       the host's 4096 x 4096 matmul rate through this LibTorch (torch::mm, best of 8 after a
//       warm-up) in fp32 and bf16: {"fp32": GFLOP/s, "bf16": GFLOP/s}, for benchmark tables
#include <torch/torch.h>

#include <chrono>

#include <boost/program_options/options_description.hpp>
#include <boost/program_options/value_semantic.hpp>
#include <boost/program_options/variables_map.hpp>
#include <zlib.h>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>

#include "data/decode.h"
#include "data/transforms.h"

#include "io/idx.h"
#include "launch/config.h"
#include "common/runtime.h"
#include "models/checkpoint.h"
#include "models/vit.h"
#include "peft/adapter_io.h"
#include "peft/method.h"

using namespace shardtune;

int make_peft_lora(char** a);  // tools/peft_reference.cpp
int peft_merge(char** a);

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

void write_idx_gz(const std::string& path, const std::vector<int64_t>& dims, const std::vector<uint8_t>& data) {
  gzFile f = gzopen(path.c_str(), "wb");
  if (!f) throw std::runtime_error(path + ": cannot write");
  std::vector<uint8_t> head = {0, 0, 0x08, static_cast<uint8_t>(dims.size())};
  for (int64_t d : dims)
    for (int shift = 24; shift >= 0; shift -= 8) head.push_back(static_cast<uint8_t>((d >> shift) & 0xff));
  gzwrite(f, head.data(), static_cast<unsigned>(head.size()));
  gzwrite(f, data.data(), static_cast<unsigned>(data.size()));
  if (gzclose(f) != Z_OK) throw std::runtime_error(path + ": write failed");
}

int image_folder(char** a) {
  namespace fs = std::filesystem;
  const std::string root = a[0], out = a[1];
  const char* names[] = {"0_tshirt_top", "1_trouser", "2_pullover", "3_dress", "4_coat",
                         "5_sandal",     "6_shirt",   "7_sneaker",  "8_bag",   "9_ankle_boot"};
  fs::create_directories(out + "/idx");
  for (int split = 0; split < 2; ++split) {
    const std::string prefix = split == 0 ? "train" : "t10k", dir = split == 0 ? "train" : "test";
    auto img = io::read_idx_u8(root + "/" + prefix + "-images-idx3-ubyte.gz");
    auto lab = io::read_idx_u8(root + "/" + prefix + "-labels-idx1-ubyte.gz");
    const int64_t n = std::min<int64_t>(std::stoll(a[2 + split]), img.dims[0]), h = img.dims[1], w = img.dims[2];
    std::vector<int64_t> order(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) order[static_cast<size_t>(i)] = i;
    std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return lab.data[x] < lab.data[y]; });
    std::vector<uint8_t> images, labels;
    fs::create_directories(out + "/png");
    std::ofstream list(out + "/png/" + dir + ".txt");
    for (size_t k = 0; k < order.size(); ++k) {
      const int64_t i = order[k];
      const uint8_t* px = img.data.data() + i * h * w;
      images.insert(images.end(), px, px + h * w);
      labels.push_back(lab.data[static_cast<size_t>(i)]);
      data::Image im{static_cast<int>(h), static_cast<int>(w), 1, std::vector<uint8_t>(px, px + h * w)};
      const std::string rel = dir + "/" + names[lab.data[static_cast<size_t>(i)]] + "/" + std::to_string(100000 + k) + ".png";
      fs::create_directories(fs::path(out + "/png/" + rel).parent_path());
      data::write_file(out + "/png/" + rel, data::encode_png(im));
      list << rel << " " << static_cast<int>(lab.data[static_cast<size_t>(i)]) << "\n";
    }
    write_idx_gz(out + "/idx/" + prefix + "-images-idx3-ubyte.gz", {n, h, w}, images);
    write_idx_gz(out + "/idx/" + prefix + "-labels-idx1-ubyte.gz", {n}, labels);
  }
  std::cout << "wrote " << out << "/png and " << out << "/idx\n";
  return 0;
}

int transform_one(char** a) {
  const std::string kind = a[1];
  const int chans = std::stoi(a[4]);
  data::Image img = data::decode_file(a[0], chans);
  std::ofstream out(a[5], std::ios::binary);
  if (kind == "decode") {
    out.write(reinterpret_cast<const char*>(img.pixels.data()), static_cast<std::streamsize>(img.pixels.size()));
    std::cout << img.height << " " << img.width << " " << img.channels << "\n";
    return out ? 0 : 1;
  }
  data::TransformSpec t;
  t.kind = kind;
  t.interpolation = a[2];
  t.image_size = std::stoll(a[3]);
  t.mean.assign(static_cast<size_t>(chans), 0.0);
  t.std.assign(static_cast<size_t>(chans), 1.0);
  data::check_transform(t);
  torch::Tensor x = data::apply_transform(img, t, 0).contiguous();
  out.write(reinterpret_cast<const char*>(x.data_ptr<float>()), static_cast<std::streamsize>(x.numel() * 4));
  std::cout << x.size(0) << " " << x.size(1) << " " << x.size(2) << "\n";
  return out ? 0 : 1;
}

// Groups of FILE KIND INTERP SIZE CHANS OUT: one process (LibTorch loads in ~1 s) for many.
int transform(int n, char** a) {
  for (int i = 0; i + 6 <= n; i += 6)
    if (transform_one(a + i) != 0) return 1;
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

int matmul_peak() {
  configure_runtime();  // the threads shardtune itself runs with (oneDNN's OpenMP pool included)
  std::cout << "{";
  const char* sep = "";
  for (auto [name, dtype] : {std::pair<const char*, torch::ScalarType>{"fp32", torch::kFloat32}, {"bf16", torch::kBFloat16}}) {
    torch::Tensor a = torch::randn({4096, 4096}).to(dtype), b = torch::randn({4096, 4096}).to(dtype);
    torch::mm(a, b);
    double best = 1e30;
    for (int i = 0; i < 8; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      torch::mm(a, b);
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    std::cout << sep << "\"" << name << "\": " << static_cast<int>(2.0 * 4096 * 4096 * 4096 / best / 1e9);
    sep = ", ";
  }
  std::cout << "}\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string cmd = argc > 1 ? argv[1] : "";
  try {
    if (cmd == "make-input" && argc == 9) return make_input(argv + 2);
    if (cmd == "make-adapter" && argc == 6) return make_adapter(argv + 2);
    if (cmd == "compare" && argc == 6) return compare(argv + 2);
    if (cmd == "make-peft-lora" && argc == 7) return make_peft_lora(argv + 2);
    if (cmd == "peft-merge" && argc == 5) return peft_merge(argv + 2);
    if (cmd == "image-folder" && argc == 6) return image_folder(argv + 2);
    if (cmd == "matmul-peak" && argc == 2) return matmul_peak();
    if (cmd == "transform" && argc >= 8 && (argc - 2) % 6 == 0) return transform(argc - 2, argv + 2);
  } catch (const std::exception& e) {
    std::cerr << "shardtune_testkit " << cmd << ": error: " << e.what() << "\n";
    return 1;
  }
  std::cerr << "usage: shardtune_testkit make-input IMAGES LABELS N SIZE CHANS MEAN,STD OUT\n"
               "       shardtune_testkit make-adapter CONFIG.ini METHOD DIR SEED\n"
               "       shardtune_testkit make-peft-lora CONFIG.ini DIR SEED RSLORA list|regex\n"
               "       shardtune_testkit peft-merge BACKBONE.safetensors ADAPTER_DIR OUT.safetensors\n"
               "       shardtune_testkit compare A.safetensors B.safetensors TENSOR RTOL\n"
               "       shardtune_testkit image-folder IDX_ROOT OUT N_TRAIN N_TEST\n"
               "       shardtune_testkit matmul-peak\n"
               "       shardtune_testkit transform FILE KIND|decode INTERP SIZE CHANS OUT [FILE KIND ...]\n";
  return 2;
}
