#include "io/idx.h"

#include <zlib.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>

namespace shardtune::io {

IdxArray read_idx_u8(const std::string& path) {
  gzFile f = gzopen(path.c_str(), "rb");  // reads plain files too
  if (!f) throw std::runtime_error(path + ": cannot open: " + std::strerror(errno));
  std::vector<uint8_t> bytes;
  uint8_t buf[1 << 16];
  int n = 0;
  while ((n = gzread(f, buf, sizeof(buf))) > 0) bytes.insert(bytes.end(), buf, buf + n);
  int err = 0;
  const char* msg = gzerror(f, &err);
  std::string zmsg = msg ? msg : "";
  gzclose(f);
  if (n < 0 || (err != Z_OK && err != Z_STREAM_END)) throw std::runtime_error(path + ": corrupt gzip data: " + zmsg);

  if (bytes.size() < 4 || bytes[0] != 0 || bytes[1] != 0)
    throw std::runtime_error(path + ": not an IDX file (bad magic)");
  if (bytes[2] != 0x08)
    throw std::runtime_error(path + ": IDX element type 0x" + std::to_string(bytes[2]) + " is not unsigned byte (0x08)");
  const int ndim = bytes[3];
  if (ndim < 1 || bytes.size() < 4 + 4 * static_cast<size_t>(ndim))
    throw std::runtime_error(path + ": truncated IDX header");
  IdxArray a;
  uint64_t total = 1;
  for (int i = 0; i < ndim; ++i) {
    const uint8_t* p = &bytes[4 + 4 * i];
    int64_t d = (int64_t{p[0]} << 24) | (p[1] << 16) | (p[2] << 8) | p[3];  // big-endian
    a.dims.push_back(d);
    total *= static_cast<uint64_t>(d);
  }
  size_t offset = 4 + 4 * static_cast<size_t>(ndim);
  if (bytes.size() - offset != total)
    throw std::runtime_error(path + ": IDX data holds " + std::to_string(bytes.size() - offset) +
                             " bytes but its dims need " + std::to_string(total));
  a.data.assign(bytes.begin() + static_cast<std::ptrdiff_t>(offset), bytes.end());
  return a;
}

}  // namespace shardtune::io
