#include "io/strict_json.h"

#include <set>
#include <vector>

#include "io/atomic_file.h"

namespace shardtune::json {

Json parse(std::string_view text, int max_depth) {
  // The callback sees every container open and every key as the parser meets them: one
  // set of keys per open object (arrays hold none), so a repeated key is caught where it is.
  std::vector<std::set<std::string>> keys;
  int open = 0;
  Json::parser_callback_t check = [&](int /*depth*/, nlohmann::json::parse_event_t event, Json& parsed) {
    using E = nlohmann::json::parse_event_t;
    switch (event) {
      case E::object_start:
      case E::array_start:
        if (++open > max_depth) throw ParseError("nesting deeper than " + std::to_string(max_depth));
        if (event == E::object_start) keys.emplace_back();
        break;
      case E::object_end:
        keys.pop_back();
        --open;
        break;
      case E::array_end:
        --open;
        break;
      case E::key:
        if (!keys.back().insert(parsed.get<std::string>()).second)
          throw ParseError("duplicate key " + parsed.dump(-1, ' ', false, Json::error_handler_t::replace));
        break;
      case E::value:
        break;
    }
    return true;
  };
  try {
    return Json::parse(text.begin(), text.end(), check);
  } catch (const nlohmann::json::exception& e) {  // parse_error, and out_of_range for a number past a double
    // "[json.exception.parse_error.101] parse error at line 1, column 4: syntax error ..." ->
    // from "parse error" on: the id is noise to a user.
    std::string what = e.what();
    const size_t at = what.find("parse error"), id_end = what.find("] ");
    throw ParseError(at != std::string::npos ? what.substr(at)
                                             : id_end != std::string::npos ? what.substr(id_end + 2) : what);
  }
}

Json read_file(const std::string& path, int max_depth) {
  const std::string text = io::read_text(path);  // names the file when it cannot be read
  try {
    return parse(text, max_depth);
  } catch (const ParseError& e) {
    throw ParseError(path + ": malformed JSON: " + e.what());
  }
}

std::string dump(const Json& v, int indent) { return v.dump(indent, ' ', false, Json::error_handler_t::replace); }

namespace {
[[noreturn]] void wrong(const Json& v, const char* want) {
  throw std::runtime_error(dump(v) + " is not " + want);
}
}  // namespace

int64_t to_int64(const Json& v) {
  if (v.is_number_unsigned()) {
    if (v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)) wrong(v, "a 64-bit signed integer");
    return static_cast<int64_t>(v.get<uint64_t>());
  }
  if (!v.is_number_integer()) wrong(v, "an integer");
  return v.get<int64_t>();
}

uint64_t to_uint64(const Json& v) {
  if (!v.is_number_unsigned()) wrong(v, "a non-negative integer");
  return v.get<uint64_t>();
}

double to_double(const Json& v) {
  if (!v.is_number()) wrong(v, "a number");
  return v.get<double>();
}

bool to_bool(const Json& v) {
  if (!v.is_boolean()) wrong(v, "true or false");
  return v.get<bool>();
}

const std::string& to_string(const Json& v) {
  if (!v.is_string()) wrong(v, "a string");
  return v.get_ref<const std::string&>();
}

const Json& at(const Json& v, const std::string& key) {
  if (!v.is_object()) throw std::runtime_error("not a JSON object (looking for \"" + key + "\")");
  auto it = v.find(key);
  if (it == v.end()) throw std::runtime_error("missing \"" + key + "\"");
  return *it;
}

}  // namespace shardtune::json
