#include "io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <set>

#include "io/atomic_file.h"
#include "io/strict_json.h"

namespace shardtune::safetensors {

// --- dtypes ------------------------------------------------------------------

namespace {
struct DTypeRow {
  DType dtype;
  const char* name;
  size_t size;
};
constexpr DTypeRow kDTypes[] = {
    {DType::BOOL, "BOOL", 1}, {DType::U8, "U8", 1},     {DType::I8, "I8", 1},     {DType::I16, "I16", 2},
    {DType::U16, "U16", 2},   {DType::F16, "F16", 2},   {DType::BF16, "BF16", 2}, {DType::I32, "I32", 4},
    {DType::U32, "U32", 4},   {DType::F32, "F32", 4},   {DType::F64, "F64", 8},   {DType::I64, "I64", 8},
    {DType::U64, "U64", 8},
};
const DTypeRow& row(DType d) { return kDTypes[static_cast<int>(d)]; }
}  // namespace

size_t dtype_size(DType d) { return row(d).size; }
const char* dtype_name(DType d) { return row(d).name; }

std::optional<DType> dtype_from_name(std::string_view name) {
  for (const auto& r : kDTypes)
    if (name == r.name) return r.dtype;
  return std::nullopt;
}

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// --- header ------------------------------------------------------------------

namespace {

[[noreturn]] void fail(const std::string& source, const std::string& what) {
  throw FormatError(source + ": " + what);
}

// Multiplies the dims and the element size, failing on overflow.
uint64_t checked_nbytes(const std::vector<int64_t>& shape, size_t elem, const std::string& source,
                        const std::string& name) {
  unsigned __int128 n = elem;
  for (int64_t d : shape) {
    n *= static_cast<uint64_t>(d);
    if (n > (static_cast<unsigned __int128>(1) << 63)) fail(source, "tensor '" + name + "' shape is too large");
  }
  return static_cast<uint64_t>(n);
}

TensorInfo parse_entry(const std::string& name, const json::Json& v, const std::string& source) {
  auto bad = [&](const std::string& what) { fail(source, "tensor '" + name + "': " + what); };
  if (!v.is_object()) bad("entry is not a JSON object");
  for (const auto& [k, _] : v.items())
    if (k != "dtype" && k != "shape" && k != "data_offsets") bad("unknown field '" + k + "'");
  auto dt = v.find("dtype"), sh = v.find("shape"), off = v.find("data_offsets");
  if (dt == v.end() || sh == v.end() || off == v.end()) bad("entry needs 'dtype', 'shape' and 'data_offsets'");
  if (!dt->is_string()) bad("'dtype' is not a string");
  auto dtype = dtype_from_name(dt->get_ref<const std::string&>());
  if (!dtype) bad("unknown dtype '" + dt->get<std::string>() + "'");

  TensorInfo t;
  t.name = name;
  t.dtype = *dtype;
  if (!sh->is_array()) bad("'shape' is not an array");
  for (const auto& d : *sh) {
    if (!d.is_number_unsigned())
      bad("shape entry " + (d.is_number() ? json::dump(d) : std::string("of the wrong type")) +
          " is not a non-negative integer");
    const uint64_t dim = d.get<uint64_t>();
    if (dim > static_cast<uint64_t>(INT64_MAX)) bad("shape entry " + json::dump(d) + " is too large");
    t.shape.push_back(static_cast<int64_t>(dim));
  }
  if (!off->is_array() || off->size() != 2) bad("'data_offsets' is not a pair [begin, end]");
  if (!(*off)[0].is_number_unsigned() || !(*off)[1].is_number_unsigned())
    bad("'data_offsets' are not non-negative integers");
  t.begin = (*off)[0].get<uint64_t>();
  t.end = (*off)[1].get<uint64_t>();
  if (t.end < t.begin)
    bad("data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) + "] end before they begin");
  uint64_t want = checked_nbytes(t.shape, dtype_size(t.dtype), source, name);
  if (t.end - t.begin != want) {
    std::string shape_text = json::dump(*sh);
    bad("shape " + shape_text + " x " + dtype_name(t.dtype) + " needs " + std::to_string(want) +
        " bytes but data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) + "] hold " +
        std::to_string(t.end - t.begin));
  }
  return t;
}

}  // namespace

Header parse_header(const uint8_t* bytes, size_t size, const std::string& source) {
  if (size < 8) fail(source, "file is " + std::to_string(size) + " bytes, shorter than the 8-byte header length");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[i];  // little-endian
  if (n > kMaxHeaderBytes)
    fail(source, "header length " + std::to_string(n) + " exceeds the " + std::to_string(kMaxHeaderBytes) +
                     "-byte limit");
  if (n > size - 8)
    fail(source, "header length " + std::to_string(n) + " runs past the end of the file (" + std::to_string(size) +
                     " bytes)");

  json::Json doc;
  try {
    doc = json::parse(std::string_view(reinterpret_cast<const char*>(bytes + 8), n));
  } catch (const json::ParseError& e) {
    fail(source, std::string("header is not valid JSON: ") + e.what());
  }
  if (!doc.is_object()) fail(source, "header is not a JSON object");

  Header h;
  h.data_offset = 8 + n;
  for (const auto& [name, v] : doc.items()) {
    if (name == "__metadata__") {
      if (!v.is_object()) fail(source, "__metadata__ is not a JSON object");
      for (const auto& [mk, mv] : v.items()) {
        if (!mv.is_string()) fail(source, "__metadata__ value of '" + mk + "' is not a string");
        h.metadata[mk] = mv.get<std::string>();
      }
      continue;
    }
    h.tensors.push_back(parse_entry(name, v, source));
  }

  // The ranges must tile [0, buffer size) exactly.
  std::stable_sort(h.tensors.begin(), h.tensors.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  const uint64_t buffer = size - h.data_offset;
  uint64_t cursor = 0;
  for (const auto& t : h.tensors) {
    if (t.end > buffer)
      fail(source, "tensor '" + t.name + "' data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
                       "] are out of range of the " + std::to_string(buffer) + "-byte data buffer");
    if (t.begin < cursor)
      fail(source, "tensor '" + t.name + "' data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
                       "] overlap the previous tensor, which ends at " + std::to_string(cursor));
    if (t.begin > cursor)
      fail(source, "gap in the data buffer: bytes [" + std::to_string(cursor) + ", " + std::to_string(t.begin) +
                       ") before tensor '" + t.name + "' belong to no tensor");
    cursor = t.end;
  }
  if (cursor != buffer)
    fail(source, "data buffer is " + std::to_string(buffer) + " bytes but the tensors cover " +
                     std::to_string(cursor) + " (trailing bytes belong to no tensor)");
  return h;
}

// --- reading -----------------------------------------------------------------

MappedFile::MappedFile(const std::string& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw FormatError(path + ": cannot open: " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    throw FormatError(path + ": cannot stat: " + std::strerror(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw FormatError(path + ": not a regular file");
  }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ > 0) {
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      int err = errno;
      ::close(fd);
      throw FormatError(path + ": mmap failed: " + std::strerror(err));
    }
    data_ = static_cast<const uint8_t*>(p);
  }
  ::close(fd);  // the mapping keeps the file alive
}

void MappedFile::release(const uint8_t* p, size_t n) const {
  if (!data_ || n == 0) return;
  const auto page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t lo = std::max(reinterpret_cast<uintptr_t>(p) & ~(page - 1), reinterpret_cast<uintptr_t>(data_));
  const uintptr_t hi = std::min((reinterpret_cast<uintptr_t>(p) + n + page - 1) & ~(page - 1),
                                reinterpret_cast<uintptr_t>(data_) + ((size_ + page - 1) & ~(page - 1)));
  // A read-only private mapping never written: dropping its pages loses nothing. Advisory:
  // a failure only leaves the pages resident.
  if (hi > lo) ::madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);
}

MappedFile::~MappedFile() {
  if (data_) ::munmap(const_cast<uint8_t*>(data_), size_);
}

File::File(const std::string& path) : map_(std::make_shared<MappedFile>(path)) {
  static const uint8_t kEmpty[1] = {0};
  header_ = parse_header(map_->data() ? map_->data() : kEmpty, map_->size(), path);
  for (size_t i = 0; i < header_.tensors.size(); ++i) index_.emplace(header_.tensors[i].name, i);
}

const TensorInfo* File::find(std::string_view name) const {
  auto it = index_.find(std::string(name));
  return it == index_.end() ? nullptr : &header_.tensors[it->second];
}

// --- writing -----------------------------------------------------------------

void write(const std::string& path, const std::vector<TensorView>& tensors,
           const std::map<std::string, std::string>& metadata) {
  json::Json header = json::Json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::set<std::string> names;
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    if (t.name == "__metadata__" || !names.insert(t.name).second)
      throw FormatError(path + ": duplicate or reserved tensor name '" + t.name + "'");
    uint64_t want = checked_nbytes(t.shape, dtype_size(t.dtype), path, t.name);
    if (want != t.nbytes)
      throw FormatError(path + ": tensor '" + t.name + "' has " + std::to_string(t.nbytes) + " bytes, its shape needs " +
                        std::to_string(want));
    header[t.name] = {{"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {offset, offset + want}}};
    offset += want;
  }
  std::string text = json::dump(header);
  text.append((8 - text.size() % 8) % 8, ' ');  // align the data buffer to 8 bytes

  io::write_atomically(path, [&](std::FILE* f) {
    uint8_t len[8];
    uint64_t n = text.size();
    for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(n >> (8 * i));
    bool ok = std::fwrite(len, 1, 8, f) == 8 && std::fwrite(text.data(), 1, text.size(), f) == text.size();
    for (const auto& t : tensors)
      ok = ok && (t.nbytes == 0 || std::fwrite(t.data, 1, t.nbytes, f) == t.nbytes);
    if (!ok) throw FormatError(path + ": write failed: " + std::strerror(errno));
  });
}

}  // namespace shardtune::safetensors
