// Model checkpoints: timm-named safetensors (one file, or many through
// model.safetensors.index.json), Hugging Face ViT/DINOv2 names mapped on the fly.
//
// Reading is lazy: a CheckpointReader knows every tensor's name, dtype and shape from the
// headers, and copies bytes out of the memory map only when a tensor is read, so a rank
// touches only the tensors (and later, the slices) it loads.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "io/safetensors.h"

namespace shardtune {

// Thrown for any checkpoint that does not fit a model; the message lists every problem.
struct CheckpointError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class CheckpointReader {
 public:
  // `path`: a .safetensors file, a model.safetensors.index.json, or a directory holding
  // either model.safetensors.index.json or model.safetensors. Hugging Face ViT / DINOv2
  // names are detected and mapped to timm names (query/key/value fused into qkv).
  explicit CheckpointReader(const std::string& path);

  const std::string& path() const { return path_; }
  std::vector<std::string> names() const;  // timm names, sorted
  bool contains(const std::string& name) const { return entries_.count(name) > 0; }
  std::vector<int64_t> shape(const std::string& name) const;
  // Copies the tensor out of the file, converted to `dtype`.
  torch::Tensor read(const std::string& name, torch::ScalarType dtype = torch::kFloat32) const;
  // Where the tensor comes from, for messages ("file.safetensors:blocks.0.attn.qkv.weight").
  std::string source(const std::string& name) const;
  bool mapped_from_hf() const { return mapped_from_hf_; }

 private:
  struct Entry {
    std::vector<int64_t> shape;
    std::string source;
    std::function<torch::Tensor(torch::ScalarType)> read;
  };
  void add_file(const std::string& file);
  void map_hf_names();

  std::string path_;
  std::vector<std::shared_ptr<safetensors::File>> files_;
  std::map<std::string, Entry> entries_;
  bool mapped_from_hf_ = false;
};

// Copies a raw safetensors tensor into a new CPU tensor of `dtype` (F32, F16, BF16, F64,
// and the integer types). The source may be unaligned.
torch::Tensor tensor_from_safetensors(const safetensors::File& file, const safetensors::TensorInfo& info,
                                      torch::ScalarType dtype);

// Loads every parameter and buffer of `module` from `reader`. Missing keys, unexpected
// keys and shape mismatches are collected and thrown together in one CheckpointError
// that lists each key with its expected and found shapes. Nothing is modified on error.
void load_state(torch::nn::Module& module, const CheckpointReader& reader);

// Compares the tensors a model expects (name -> shape) with what `reader` holds under
// `key_prefix` + name: one line per missing key, shape mismatch and unexpected key (keys
// starting with `ignore_prefix` are never unexpected). Throws one CheckpointError listing
// them all ("PATH does not fit the model: N problems: ...").
using ShapeList = std::vector<std::pair<std::string, std::vector<int64_t>>>;
void check_fits(const ShapeList& expected, const CheckpointReader& reader, const std::string& key_prefix = "",
                const std::string& ignore_prefix = "");
ShapeList shapes_of(const std::vector<std::pair<std::string, torch::Tensor>>& tensors);

// Writes named tensors (converted to contiguous CPU, dtype kept) as one safetensors file,
// atomically.
void save_tensors(const std::string& path, const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                  const std::map<std::string, std::string>& metadata = {});

// The module's parameters and buffers as (name, tensor), in registration order.
std::vector<std::pair<std::string, torch::Tensor>> state_of(const torch::nn::Module& module);

std::string shape_str(const std::vector<int64_t>& shape);

}  // namespace shardtune
