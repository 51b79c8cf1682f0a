// JSON through nlohmann/json (Debian's nlohmann-json3-dev), with the checks ShardTune's
// untrusted inputs need on top of RFC 8259: the safetensors header, adapter configs,
// manifests and trainer state are parsed by `parse`, which also rejects duplicate object
// keys (nlohmann keeps the last one silently) and nesting deeper than a limit.
//
// Json keeps objects in insertion order (summary.json, metrics lines read as written);
// nlohmann::json (sorted keys) is what files that promise sorted keys use.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>

namespace shardtune::json {

using Json = nlohmann::ordered_json;

struct ParseError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// One JSON document. Throws ParseError saying what is wrong and where (nlohmann's byte
// position), for a syntax error, trailing data, a duplicate key or nesting deeper than
// `max_depth` arrays/objects.
Json parse(std::string_view text, int max_depth = 64);

// Reads and parses a file: every error names the file ("PATH: malformed JSON: ...").
Json read_file(const std::string& path, int max_depth = 64);

// Compact (indent < 0) or indented text; bytes that are not UTF-8 (file names) become U+FFFD
// instead of throwing.
std::string dump(const Json& v, int indent = -1);

// Typed reads that refuse what nlohmann would convert silently (1.5 as an integer, -1 as
// unsigned, 1e3 as an integer). Throw std::runtime_error naming the value.
int64_t to_int64(const Json& v);
uint64_t to_uint64(const Json& v);  // a non-negative integer literal
double to_double(const Json& v);
bool to_bool(const Json& v);
const std::string& to_string(const Json& v);
// Object member `key`; throws std::runtime_error "missing "key"" when absent or `v` is no object.
const Json& at(const Json& v, const std::string& key);

}  // namespace shardtune::json
