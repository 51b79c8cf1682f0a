// A small strict JSON value, parser and writer.
//
// Used for the safetensors header (untrusted input: depth-capped, duplicate keys
// rejected), adapter configs and metrics. Numbers keep their source text so that
// 64-bit offsets survive exactly; objects keep insertion order for stable output.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace shardtune::json {

struct ParseError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class Value {
 public:
  enum class Kind { Null, Bool, Number, String, Array, Object };
  using Array = std::vector<Value>;
  using Object = std::vector<std::pair<std::string, Value>>;  // insertion order, unique keys

  Value() = default;
  Value(std::nullptr_t) {}
  Value(bool b) : kind_(Kind::Bool), bool_(b) {}
  Value(int v) : Value(static_cast<int64_t>(v)) {}
  Value(int64_t v) : kind_(Kind::Number), text_(std::to_string(v)) {}
  Value(uint64_t v) : kind_(Kind::Number), text_(std::to_string(v)) {}
  Value(double v);
  Value(const char* s) : kind_(Kind::String), text_(s) {}
  Value(std::string s) : kind_(Kind::String), text_(std::move(s)) {}
  Value(Array a) : kind_(Kind::Array), array_(std::make_shared<Array>(std::move(a))) {}
  Value(Object o) : kind_(Kind::Object), object_(std::make_shared<Object>(std::move(o))) {}
  static Value number_from_text(std::string text);

  Kind kind() const { return kind_; }
  bool is_null() const { return kind_ == Kind::Null; }
  bool is_bool() const { return kind_ == Kind::Bool; }
  bool is_number() const { return kind_ == Kind::Number; }
  bool is_string() const { return kind_ == Kind::String; }
  bool is_array() const { return kind_ == Kind::Array; }
  bool is_object() const { return kind_ == Kind::Object; }

  // Accessors throw std::runtime_error on a kind mismatch or an out-of-range number.
  bool as_bool() const;
  double as_double() const;
  int64_t as_int64() const;
  uint64_t as_uint64() const;  // rejects negatives, fractions and exponents
  const std::string& as_string() const;
  const Array& as_array() const;
  const Object& as_object() const;

  // Object access: find returns nullptr when absent; set appends or replaces.
  const Value* find(std::string_view key) const;
  const Value& at(std::string_view key) const;
  Value& set(std::string key, Value v);

  std::string dump(int indent = -1) const;  // indent < 0: compact, one line

 private:
  void dump_to(std::string& out, int indent, int level) const;

  Kind kind_ = Kind::Null;
  bool bool_ = false;
  std::string text_;  // String payload, or Number source text
  std::shared_ptr<Array> array_;
  std::shared_ptr<Object> object_;
};

// Parses one JSON document (RFC 8259). Rejects trailing data, duplicate object
// keys, invalid UTF-8 escapes, control characters in strings and nesting deeper
// than max_depth. The message says what is wrong and at which byte offset.
Value parse(std::string_view text, int max_depth = 64);

std::string quote(std::string_view s);  // a JSON string literal

}  // namespace shardtune::json
