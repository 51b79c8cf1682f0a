// IDX files (MNIST, Fashion-MNIST), gzipped or plain, read through zlib. Torch-free.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace shardtune::io {

// An IDX array of unsigned bytes (type code 0x08): dims and row-major data.
struct IdxArray {
  std::vector<int64_t> dims;
  std::vector<uint8_t> data;
};

// Reads `path` (gzip or raw). Throws std::runtime_error naming the file and the problem:
// missing, not gzip/IDX, wrong magic, unsupported type, truncated data.
IdxArray read_idx_u8(const std::string& path);

}  // namespace shardtune::io
