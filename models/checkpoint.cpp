#include "models/checkpoint.h"

#include <sys/stat.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <set>
#include <sstream>

#include "io/atomic_file.h"
#include "io/strict_json.h"

namespace shardtune {

namespace sf = safetensors;

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// --- raw tensors -------------------------------------------------------------------

namespace {

torch::ScalarType scalar_type_of(sf::DType d, const std::string& where) {
  switch (d) {
    case sf::DType::BOOL: return torch::kBool;
    case sf::DType::U8: return torch::kUInt8;
    case sf::DType::I8: return torch::kInt8;
    case sf::DType::I16: return torch::kInt16;
    case sf::DType::F16: return torch::kFloat16;
    case sf::DType::BF16: return torch::kBFloat16;
    case sf::DType::I32: return torch::kInt32;
    case sf::DType::F32: return torch::kFloat32;
    case sf::DType::F64: return torch::kFloat64;
    case sf::DType::I64: return torch::kInt64;
    default: break;
  }
  throw CheckpointError(where + ": dtype " + sf::dtype_name(d) + " has no LibTorch equivalent");
}

sf::DType safetensors_dtype_of(torch::ScalarType t, const std::string& name) {
  switch (t) {
    case torch::kBool: return sf::DType::BOOL;
    case torch::kUInt8: return sf::DType::U8;
    case torch::kInt8: return sf::DType::I8;
    case torch::kInt16: return sf::DType::I16;
    case torch::kFloat16: return sf::DType::F16;
    case torch::kBFloat16: return sf::DType::BF16;
    case torch::kInt32: return sf::DType::I32;
    case torch::kFloat32: return sf::DType::F32;
    case torch::kFloat64: return sf::DType::F64;
    case torch::kInt64: return sf::DType::I64;
    default: break;
  }
  throw CheckpointError("tensor '" + name + "' has a dtype safetensors cannot store: " +
                        std::string(c10::toString(t)));
}

bool is_directory(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

bool file_exists(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

bool starts_with(const std::string& s, const std::string& prefix) { return s.rfind(prefix, 0) == 0; }

std::string dir_of(const std::string& p) {
  auto slash = p.find_last_of('/');
  return slash == std::string::npos ? "." : p.substr(0, slash);
}

// Copies entries `index` (ascending) along `dim` of a raw tensor: one memcpy per run of
// consecutive indices per outer row, so only those bytes of the map are touched.
torch::Tensor slice_from_safetensors(const sf::File& file, const sf::TensorInfo& info, torch::ScalarType dtype,
                                     int64_t dim, const std::vector<int64_t>& index, size_t* bytes) {
  const std::string where = file.path() + ":" + info.name;
  const auto rank = static_cast<int64_t>(info.shape.size());
  if (dim < 0 || dim >= rank) throw CheckpointError(where + ": cannot slice dim " + std::to_string(dim));
  std::vector<int64_t> shape = info.shape;
  shape[static_cast<size_t>(dim)] = static_cast<int64_t>(index.size());
  torch::Tensor raw = torch::empty(shape, torch::TensorOptions().dtype(scalar_type_of(info.dtype, where)));
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < dim; ++d) outer *= info.shape[static_cast<size_t>(d)];
  for (int64_t d = dim + 1; d < rank; ++d) inner *= info.shape[static_cast<size_t>(d)];
  const int64_t extent = info.shape[static_cast<size_t>(dim)];
  const size_t row = static_cast<size_t>(inner) * raw.element_size();
  const auto* src = reinterpret_cast<const char*>(file.data(info));
  auto* dst = static_cast<char*>(raw.data_ptr());
  for (size_t i = 0; i < index.size(); ++i)
    if (index[i] < 0 || index[i] >= extent || (i && index[i] <= index[i - 1]))
      throw CheckpointError(where + ": slice index " + std::to_string(index[i]) + " is out of order or outside [0, " +
                            std::to_string(extent) + ")");
  for (int64_t o = 0; o < outer; ++o) {
    for (size_t i = 0; i < index.size();) {
      size_t j = i + 1;
      while (j < index.size() && index[j] == index[j - 1] + 1) ++j;
      const size_t n = (j - i) * row;
      std::memcpy(dst, src + (static_cast<size_t>(o * extent + index[i])) * row, n);
      dst += n;
      *bytes += n;
      i = j;
    }
  }
  file.release(info);
  return raw.scalar_type() == dtype ? raw : raw.to(dtype);
}

}  // namespace

torch::Tensor tensor_from_safetensors(const sf::File& file, const sf::TensorInfo& info, torch::ScalarType dtype) {
  const std::string where = file.path() + ":" + info.name;
  torch::Tensor raw = torch::empty(info.shape, torch::TensorOptions().dtype(scalar_type_of(info.dtype, where)));
  const size_t nbytes = info.end - info.begin;
  if (nbytes) std::memcpy(raw.data_ptr(), file.data(info), nbytes);  // memcpy: the source may be unaligned
  file.release(info);
  return raw.scalar_type() == dtype ? raw : raw.to(dtype);
}

// --- CheckpointReader --------------------------------------------------------------

CheckpointReader::CheckpointReader(const std::string& path) : path_(path) {
  std::string p = path;
  if (is_directory(p)) {
    if (file_exists(p + "/model.safetensors.index.json")) {
      p += "/model.safetensors.index.json";
    } else if (file_exists(p + "/model.safetensors")) {
      p += "/model.safetensors";
    } else {
      throw CheckpointError(path + ": directory holds neither model.safetensors nor model.safetensors.index.json");
    }
  }
  if (ends_with(p, ".index.json")) {
    json::Json index;
    try {
      index = json::parse(io::read_text(p));
    } catch (const std::exception& e) {
      throw CheckpointError(p + ": cannot read the checkpoint index: " + e.what());
    }
    auto map = index.is_object() ? index.find("weight_map") : index.end();
    if (map == index.end() || !map->is_object()) throw CheckpointError(p + ": index has no \"weight_map\" object");
    std::set<std::string> shards;
    std::map<std::string, std::string> expected;  // tensor -> shard file
    for (const auto& [name, file] : map->items()) {
      if (!file.is_string()) throw CheckpointError(p + ": weight_map entry '" + name + "' is not a file name");
      shards.insert(file.get<std::string>());
      expected[name] = file.get<std::string>();
    }
    for (const auto& shard : shards) add_file(dir_of(p) + "/" + shard);
    for (const auto& [name, file] : expected) {
      auto it = entries_.find(name);
      if (it == entries_.end() || !ends_with(it->second.source, "/" + file + ":" + name))
        throw CheckpointError(p + ": weight_map puts '" + name + "' in " + file + " but that file does not hold it");
    }
    if (entries_.size() != expected.size())
      throw CheckpointError(p + ": the shard files hold " + std::to_string(entries_.size()) +
                            " tensors but weight_map lists " + std::to_string(expected.size()));
  } else {
    add_file(p);
  }
  map_hf_names();
}

void CheckpointReader::add_file(const std::string& file) {
  auto f = std::make_shared<sf::File>(file);
  files_.push_back(f);
  for (const auto& info : f->header().tensors) {
    if (entries_.count(info.name))
      throw CheckpointError(file + ": tensor '" + info.name + "' also appears in " + entries_[info.name].source);
    Entry e;
    e.shape = info.shape;
    e.source = file + ":" + info.name;
    const sf::TensorInfo* ip = f->find(info.name);
    auto bytes = bytes_read_;
    e.read = [f, ip, bytes](torch::ScalarType dt) {
      *bytes += ip->end - ip->begin;
      return tensor_from_safetensors(*f, *ip, dt);
    };
    e.read_index = [f, ip, bytes](torch::ScalarType dt, int64_t dim, const std::vector<int64_t>& index) {
      return slice_from_safetensors(*f, *ip, dt, dim, index, bytes.get());
    };
    entries_.emplace(info.name, std::move(e));
  }
}

// Hugging Face ViTModel / ViTForImageClassification / Dinov2Model names -> timm names.
void CheckpointReader::map_hf_names() {
  bool hf = false;
  for (const auto& [name, _] : entries_)
    hf = hf || starts_with(name, "embeddings.") || starts_with(name, "vit.embeddings.") ||
         starts_with(name, "dinov2.embeddings.");
  if (!hf) return;
  mapped_from_hf_ = true;

  static const std::vector<std::pair<std::string, std::string>> kBlockParts = {
      {"layernorm_before.", "norm1."},       {"norm1.", "norm1."},
      {"layernorm_after.", "norm2."},        {"norm2.", "norm2."},
      {"attention.output.dense.", "attn.proj."},
      {"intermediate.dense.", "mlp.fc1."},   {"output.dense.", "mlp.fc2."},
      {"mlp.fc1.", "mlp.fc1."},              {"mlp.fc2.", "mlp.fc2."},
      {"layer_scale1.lambda1", "ls1.gamma"}, {"layer_scale2.lambda1", "ls2.gamma"},
  };
  std::map<std::string, Entry> out;
  // qkv pieces: timm name -> {query, key, value}
  std::map<std::string, std::array<const Entry*, 3>> qkv;
  for (auto& [raw, e] : entries_) {
    std::string n = raw;
    for (const char* prefix : {"vit.", "dinov2."})
      if (starts_with(n, prefix)) n = n.substr(std::strlen(prefix));
    std::string mapped;
    if (n == "embeddings.cls_token") mapped = "cls_token";
    else if (n == "embeddings.position_embeddings") mapped = "pos_embed";
    else if (starts_with(n, "embeddings.patch_embeddings.projection.")) mapped = "patch_embed.proj." + n.substr(39);
    else if (n == "embeddings.mask_token" || starts_with(n, "pooler.")) continue;  // not part of a timm ViT
    else if (starts_with(n, "layernorm.")) mapped = "norm." + n.substr(10);
    else if (starts_with(n, "classifier.")) mapped = "head." + n.substr(11);
    else if (starts_with(n, "encoder.layer.")) {
      std::string rest = n.substr(14);
      auto dot = rest.find('.');
      std::string idx = rest.substr(0, dot), part = dot == std::string::npos ? "" : rest.substr(dot + 1);
      std::string block = "blocks." + idx + ".";
      int which = -1;
      for (int k = 0; k < 3; ++k) {
        static const char* kQkv[] = {"attention.attention.query.", "attention.attention.key.",
                                     "attention.attention.value."};
        if (starts_with(part, kQkv[k])) {
          which = k;
          qkv[block + "attn.qkv." + part.substr(std::strlen(kQkv[k]))][static_cast<size_t>(k)] = &e;
        }
      }
      if (which >= 0) continue;
      for (const auto& [from, to] : kBlockParts)
        if (mapped.empty() && starts_with(part, from)) mapped = block + to + part.substr(from.size());
    }
    out[mapped.empty() ? raw : mapped] = e;  // unmapped names surface as unexpected keys
  }
  for (const auto& [name, parts] : qkv) {
    if (!parts[0] || !parts[1] || !parts[2]) {  // incomplete: keep the pieces so the loader reports them
      for (const Entry* p : parts)
        if (p) out[p->source.substr(p->source.rfind(':') + 1)] = *p;
      continue;
    }
    Entry fused;
    fused.shape = parts[0]->shape;
    fused.shape[0] *= 3;
    fused.source = parts[0]->source + " (+key, value)";
    auto q = parts[0]->read, k = parts[1]->read, v = parts[2]->read;
    fused.read = [q, k, v](torch::ScalarType dt) { return torch::cat({q(dt), k(dt), v(dt)}, 0); };
    fused.read_index = [read = fused.read](torch::ScalarType dt, int64_t dim, const std::vector<int64_t>& index) {
      return read(dt).index_select(dim, torch::tensor(index, torch::kInt64));
    };
    out[name] = std::move(fused);
  }
  entries_ = std::move(out);
}

std::vector<std::string> CheckpointReader::names() const {
  std::vector<std::string> n;
  for (const auto& [k, _] : entries_) n.push_back(k);
  return n;
}

std::vector<int64_t> CheckpointReader::shape(const std::string& name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) throw CheckpointError(path_ + ": no tensor '" + name + "'");
  return it->second.shape;
}

torch::Tensor CheckpointReader::read(const std::string& name, torch::ScalarType dtype) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) throw CheckpointError(path_ + ": no tensor '" + name + "'");
  return it->second.read(dtype);
}

torch::Tensor CheckpointReader::read(const std::string& name, torch::ScalarType dtype, int64_t dim,
                                     const std::vector<int64_t>& index) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) throw CheckpointError(path_ + ": no tensor '" + name + "'");
  return it->second.read_index(dtype, dim, index);
}

std::string CheckpointReader::source(const std::string& name) const {
  auto it = entries_.find(name);
  return it == entries_.end() ? path_ + ":" + name : it->second.source;
}

KeyFilter keys_of_other_stages(const StagePart& part, const std::string& prefix) {
  return [part, prefix](const std::string& full) {
    if (!starts_with(full, prefix)) return false;
    const std::string key = full.substr(prefix.size());
    if (starts_with(key, "blocks.")) {
      const int64_t i = std::atoll(key.c_str() + 7);
      return i < part.first_block || i >= part.end_block;
    }
    if (starts_with(key, "patch_embed.") || key == "cls_token" || key == "pos_embed" || starts_with(key, "side_in."))
      return !part.embed;
    if (starts_with(key, "norm.") || starts_with(key, "fc_norm.") || starts_with(key, "head.") ||
        starts_with(key, "side_out."))
      return !part.head;
    return false;
  };
}

// --- model state ------------------------------------------------------------------

std::vector<std::pair<std::string, torch::Tensor>> state_of(const torch::nn::Module& module) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& p : module.named_parameters()) out.emplace_back(p.key(), p.value());
  for (const auto& b : module.named_buffers()) out.emplace_back(b.key(), b.value());
  return out;
}

ShapeList shapes_of(const std::vector<std::pair<std::string, torch::Tensor>>& tensors) {
  ShapeList out;
  for (const auto& [name, t] : tensors) out.emplace_back(name, t.sizes().vec());
  return out;
}

void check_fits(const ShapeList& expected, const CheckpointReader& reader, const std::string& key_prefix,
                const std::string& ignore_prefix, const KeyFilter& elsewhere) {
  std::map<std::string, std::vector<int64_t>> found;
  for (const auto& key : reader.names()) found[key] = reader.shape(key);
  check_fits(expected, found, reader.path(), key_prefix, ignore_prefix, elsewhere);
}

void check_fits(const ShapeList& expected, const std::map<std::string, std::vector<int64_t>>& found,
                const std::string& path, const std::string& key_prefix, const std::string& ignore_prefix,
                const KeyFilter& elsewhere) {
  std::vector<std::string> problems;
  std::set<std::string> names;
  for (const auto& [name, shape] : expected) {
    const std::string key = key_prefix + name;
    names.insert(key);
    auto it = found.find(key);
    if (it == found.end()) {
      problems.push_back("missing key " + key + " (expected shape " + shape_str(shape) + ")");
    } else if (it->second != shape) {
      problems.push_back("shape mismatch for " + key + ": expected " + shape_str(shape) + ", found " +
                         shape_str(it->second));
    }
  }
  for (const auto& [key, shape] : found)
    if (!names.count(key) && (ignore_prefix.empty() || key.rfind(ignore_prefix, 0) != 0) && !(elsewhere && elsewhere(key)))
      problems.push_back("unexpected key " + key + " (shape " + shape_str(shape) + ")");
  if (problems.empty()) return;
  std::string msg = path + " does not fit the model: " + std::to_string(problems.size()) + " problem" +
                    (problems.size() > 1 ? "s" : "") + ": ";
  for (size_t i = 0; i < problems.size(); ++i) msg += (i ? "; " : "") + problems[i];
  throw CheckpointError(msg);
}

void load_state(torch::nn::Module& module, const CheckpointReader& reader, const ShardMap& shards,
                const KeyFilter& elsewhere) {
  auto state = state_of(module);
  if (elsewhere)  // the module's own tensors that the caller leaves out (e.g. a new task's head)
    state.erase(std::remove_if(state.begin(), state.end(), [&](const auto& e) { return elsewhere(e.first); }), state.end());
  ShapeList expected = shapes_of(state);
  for (auto& [name, shape] : expected)
    if (auto it = shards.find(name); it != shards.end()) shape = it->second.full_shape;
  check_fits(expected, reader, "", "", elsewhere);  // nothing is modified unless everything fits
  torch::NoGradGuard no_grad;
  for (auto& [name, t] : state) {
    auto it = shards.find(name);
    t.copy_(it == shards.end() ? reader.read(name, t.scalar_type())
                               : reader.read(name, t.scalar_type(), it->second.dim, it->second.index));
  }
}

void save_tensors(const std::string& path, const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                  const std::map<std::string, std::string>& metadata) {
  std::vector<torch::Tensor> keep;  // contiguous CPU copies live until the write is done
  std::vector<sf::TensorView> views;
  for (const auto& [name, t] : tensors) {
    torch::Tensor c = t.detach().to(torch::kCPU).contiguous();
    keep.push_back(c);
    sf::TensorView v;
    v.name = name;
    v.dtype = safetensors_dtype_of(c.scalar_type(), name);
    v.shape = c.sizes().vec();
    v.data = c.data_ptr();
    v.nbytes = c.numel() * c.element_size();
    views.push_back(std::move(v));
  }
  sf::write(path, views, metadata);
}

}  // namespace shardtune
