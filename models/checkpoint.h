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
#include "models/vit.h"

namespace shardtune {

// Thrown for any checkpoint that does not fit a model; the message lists every problem.
struct CheckpointError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// One rank's part of a tensor split along `dim`: the indices it holds there (ascending),
// and the whole tensor's shape as the checkpoint stores it.
struct TensorShard {
  int64_t dim = 0;
  std::vector<int64_t> index;
  std::vector<int64_t> full_shape;
};
using ShardMap = std::map<std::string, TensorShard>;  // by parameter name
// Keys a model part leaves to other ranks (another pipeline stage's blocks): never "unexpected".
using KeyFilter = std::function<bool(const std::string&)>;

// The keys (after `prefix`) of the parts of a model that a pipeline stage does not build:
// other stages' blocks, the embedding off the first stage, norm and head off the last.
KeyFilter keys_of_other_stages(const StagePart& part, const std::string& prefix = "");

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
  // Only the entries `index` (ascending) along `dim`, converted to `dtype`: copies just those
  // bytes out of the memory map (a fused Hugging Face qkv is read whole, then indexed).
  torch::Tensor read(const std::string& name, torch::ScalarType dtype, int64_t dim, const std::vector<int64_t>& index) const;
  // Bytes copied out of the checkpoint's files so far.
  size_t bytes_read() const { return *bytes_read_; }
  // Where the tensor comes from, for messages ("file.safetensors:blocks.0.attn.qkv.weight").
  std::string source(const std::string& name) const;
  bool mapped_from_hf() const { return mapped_from_hf_; }

 private:
  struct Entry {
    std::vector<int64_t> shape;
    std::string source;
    std::function<torch::Tensor(torch::ScalarType)> read;
    std::function<torch::Tensor(torch::ScalarType, int64_t, const std::vector<int64_t>&)> read_index;
  };
  void add_file(const std::string& file);
  void map_hf_names();

  std::string path_;
  std::vector<std::shared_ptr<safetensors::File>> files_;
  std::map<std::string, Entry> entries_;
  bool mapped_from_hf_ = false;
  std::shared_ptr<size_t> bytes_read_ = std::make_shared<size_t>(0);
};

// Copies a raw safetensors tensor into a new CPU tensor of `dtype` (F32, F16, BF16, F64,
// and the integer types). The source may be unaligned.
torch::Tensor tensor_from_safetensors(const safetensors::File& file, const safetensors::TensorInfo& info,
                                      torch::ScalarType dtype);

// Loads every parameter and buffer of `module` from `reader`. Missing keys, unexpected
// keys and shape mismatches are collected and thrown together in one CheckpointError
// that lists each key with its expected and found shapes. Nothing is modified on error.
// Tensors in `shards` are read as this rank's slices only (checked against their full
// shape); keys `elsewhere` accepts belong to other ranks and are skipped.
void load_state(torch::nn::Module& module, const CheckpointReader& reader, const ShardMap& shards = {},
                const KeyFilter& elsewhere = nullptr);

// Compares the tensors a model expects (name -> shape) with what `reader` holds under
// `key_prefix` + name: one line per missing key, shape mismatch and unexpected key (keys
// starting with `ignore_prefix` are never unexpected). Throws one CheckpointError listing
// them all ("PATH does not fit the model: N problems: ..."). Keys `elsewhere` accepts are
// never unexpected either.
using ShapeList = std::vector<std::pair<std::string, std::vector<int64_t>>>;
void check_fits(const ShapeList& expected, const CheckpointReader& reader, const std::string& key_prefix = "",
                const std::string& ignore_prefix = "", const KeyFilter& elsewhere = nullptr);
// The same against tensors already in memory (key -> shape), `path` naming where they came from.
void check_fits(const ShapeList& expected, const std::map<std::string, std::vector<int64_t>>& found,
                const std::string& path, const std::string& key_prefix = "", const std::string& ignore_prefix = "",
                const KeyFilter& elsewhere = nullptr);
ShapeList shapes_of(const std::vector<std::pair<std::string, torch::Tensor>>& tensors);

// Writes named tensors (converted to contiguous CPU, dtype kept) as one safetensors file,
// atomically.
void save_tensors(const std::string& path, const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                  const std::map<std::string, std::string>& metadata = {});

// The module's parameters and buffers as (name, tensor), in registration order.
std::vector<std::pair<std::string, torch::Tensor>> state_of(const torch::nn::Module& module);

std::string shape_str(const std::vector<int64_t>& shape);

}  // namespace shardtune
