// libFuzzer target: the safetensors header parser on arbitrary bytes. The only acceptable
// outcomes are a parsed header whose ranges lie inside the input, or a FormatError.
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace sf = shardtune::safetensors;
  try {
    sf::Header h = sf::parse_header(data, size, "fuzz");
    for (const auto& t : h.tensors) {
      // Invariants the loader relies on: every range is inside the file and sized by its shape.
      if (h.data_offset + t.end > size || t.end < t.begin) std::abort();
      if (t.end - t.begin != static_cast<uint64_t>(t.numel()) * sf::dtype_size(t.dtype)) std::abort();
    }
  } catch (const sf::FormatError&) {
  }
  return 0;
}
