// shardtune_make_input: turns the first N images of an IDX image/label pair (e.g.
// Fashion-MNIST's test set) into the input file of `shardtune predict`:
//   input  [N, C, S, S] float32: bilinear resize to S, grey repeated to C channels,
//                                 (x/255 - mean) / std
//   labels [N] int64
#include <torch/torch.h>

#include <iostream>
#include <string>

#include "io/idx.h"
#include "models/checkpoint.h"

int main(int argc, char** argv) {
  if (argc != 8) {
    std::cerr << "usage: shardtune_make_input IMAGES.idx[.gz] LABELS.idx[.gz] N SIZE CHANS MEAN,STD OUT.safetensors\n";
    return 2;
  }
  try {
    auto images = shardtune::io::read_idx_u8(argv[1]);
    auto labels = shardtune::io::read_idx_u8(argv[2]);
    const int64_t n = std::stoll(argv[3]), size = std::stoll(argv[4]), chans = std::stoll(argv[5]);
    const std::string norm = argv[6];
    const double mean = std::stod(norm.substr(0, norm.find(','))), std = std::stod(norm.substr(norm.find(',') + 1));
    if (images.dims.size() != 3 || labels.dims.size() != 1 || images.dims[0] != labels.dims[0])
      throw std::runtime_error("images must be [N, H, W] and labels [N] of the same N");
    if (n <= 0 || n > images.dims[0])
      throw std::runtime_error("N=" + std::to_string(n) + " must be in [1, " + std::to_string(images.dims[0]) + "]");
    const int64_t h = images.dims[1], w = images.dims[2];
    torch::Tensor x = torch::from_blob(images.data.data(), {n, 1, h, w}, torch::kUInt8).to(torch::kFloat32) / 255.0;
    if (size != h || size != w)
      x = torch::nn::functional::interpolate(
          x, torch::nn::functional::InterpolateFuncOptions().size(std::vector<int64_t>{size, size}).mode(torch::kBilinear).align_corners(false));
    x = ((x - mean) / std).expand({n, chans, size, size}).contiguous();
    torch::Tensor y = torch::from_blob(labels.data.data(), {n}, torch::kUInt8).to(torch::kInt64);
    shardtune::save_tensors(argv[7], {{"input", x}, {"labels", y}});
    std::cout << "wrote " << n << " images [" << chans << ", " << size << ", " << size << "] to " << argv[7] << "\n";
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "shardtune_make_input: error: " << e.what() << "\n";
    return 1;
  }
}
