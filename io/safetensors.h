// safetensors: reader (mmap, strict validation) and writer (atomic), torch-free.
//
// Layout: u64 little-endian header length N, N bytes of UTF-8 JSON
//   {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}}
// then the data buffer; offsets are relative to its start, end exclusive. The ranges must
// tile the buffer exactly (no gaps, no overlaps) and the buffer must end the file.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace shardtune::safetensors {

inline constexpr uint64_t kMaxHeaderBytes = 100ull << 20;  // 100 MB, as the reference implementation

enum class DType { BOOL, U8, I8, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64 };

size_t dtype_size(DType d);
const char* dtype_name(DType d);
std::optional<DType> dtype_from_name(std::string_view name);

// Every problem with a file: the message starts with the file name.
struct FormatError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offsets into the data buffer, end exclusive
  uint64_t end = 0;
  int64_t numel() const;
};

struct Header {
  std::vector<TensorInfo> tensors;  // in file order of their data
  std::map<std::string, std::string> metadata;
  uint64_t data_offset = 0;  // 8 + header length: where the data buffer starts in the file
};

// Parses and validates the header of a whole file image [bytes, bytes + size).
// `source` names the file in error messages. Never reads outside the image.
Header parse_header(const uint8_t* bytes, size_t size, const std::string& source);

// A read-only memory map of a whole file; pages are touched only when read.
class MappedFile {
 public:
  explicit MappedFile(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }
  // Drops the pages of [p, p + n) (rounded out to whole pages) from this process's mapping
  // once they have been copied: the page cache keeps them and a later read faults them back
  // in, but they stop counting in this process's resident set while a large checkpoint loads.
  void release(const uint8_t* p, size_t n) const;

 private:
  std::string path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

// An opened, validated safetensors file.
class File {
 public:
  explicit File(const std::string& path);

  const std::string& path() const { return map_->path(); }
  const Header& header() const { return header_; }
  const TensorInfo* find(std::string_view name) const;  // nullptr when absent
  const uint8_t* data(const TensorInfo& t) const { return map_->data() + header_.data_offset + t.begin; }
  void release(const TensorInfo& t) const { map_->release(data(t), t.end - t.begin); }  // see MappedFile

 private:
  std::shared_ptr<MappedFile> map_;
  Header header_;
  std::unordered_map<std::string, size_t> index_;
};

// One tensor to write: the bytes are little-endian, row-major, dtype_size * numel long.
struct TensorView {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  size_t nbytes = 0;
};

// Writes `path` atomically: a temporary file beside it, fsync, rename. Names must be
// unique; the header is padded with spaces to a multiple of 8 so data is aligned.
void write(const std::string& path, const std::vector<TensorView>& tensors,
           const std::map<std::string, std::string>& metadata = {});

}  // namespace shardtune::safetensors
