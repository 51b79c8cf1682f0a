// The JSON parser is the first thing untrusted checkpoint bytes reach: it must accept
// RFC 8259 documents exactly and reject everything else with a message.
#include <gtest/gtest.h>

#include "io/json.h"

using shardtune::json::parse;
using shardtune::json::ParseError;
using shardtune::json::Value;

TEST(Json, ParsesEveryKind) {
  Value v = parse(R"({"a": [1, -2.5e3, true, false, null], "s": "x\u00e9\n\"", "o": {}})");
  ASSERT_TRUE(v.is_object());
  const auto& a = v.at("a").as_array();
  EXPECT_EQ(a[0].as_int64(), 1);
  EXPECT_DOUBLE_EQ(a[1].as_double(), -2500.0);
  EXPECT_TRUE(a[2].as_bool());
  EXPECT_FALSE(a[3].as_bool());
  EXPECT_TRUE(a[4].is_null());
  EXPECT_EQ(v.at("s").as_string(), "x\xc3\xa9\n\"");
  EXPECT_TRUE(v.at("o").as_object().empty());
}

TEST(Json, KeepsLargeIntegersExact) {
  Value v = parse("[18446744073709551615, 9007199254740993]");
  EXPECT_EQ(v.as_array()[0].as_uint64(), 18446744073709551615ull);
  EXPECT_EQ(v.as_array()[1].as_int64(), 9007199254740993ll);
  EXPECT_THROW(parse("-1").as_uint64(), std::runtime_error);
  EXPECT_THROW(parse("1.5").as_uint64(), std::runtime_error);
  EXPECT_THROW(parse("18446744073709551616").as_uint64(), std::runtime_error);
}

TEST(Json, DumpRoundTrips) {
  const std::string text = R"({"b":[1,2,{"c":"d\\e"}],"a":true,"n":null})";
  EXPECT_EQ(parse(text).dump(), text);  // insertion order is kept
  Value obj;
  obj.set("x", 1);
  obj.set("y", "z");
  obj.set("x", 2);  // replaces
  EXPECT_EQ(obj.dump(), R"({"x":2,"y":"z"})");
  EXPECT_EQ(parse(obj.dump(2)).dump(), obj.dump());
}

struct BadJson {
  const char* text;
  const char* message;
};
inline void PrintTo(const BadJson& c, std::ostream* os) { *os << shardtune::json::quote(c.text); }


class JsonRejects : public ::testing::TestWithParam<BadJson> {};

TEST_P(JsonRejects, WithMessage) {
  try {
    parse(GetParam().text, 8);
    FAIL() << "accepted: " << GetParam().text;
  } catch (const ParseError& e) {
    EXPECT_NE(std::string(e.what()).find(GetParam().message), std::string::npos) << e.what();
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, JsonRejects,
                         ::testing::Values(BadJson{"", "unexpected end"}, BadJson{"{", "expected a string key"},
                                           BadJson{R"({"a":1,"a":2})", "duplicate key \"a\""},
                                           BadJson{"[1,]", "unexpected character"}, BadJson{"[1] x", "after the JSON"},
                                           BadJson{"[[[[[[[[[[1]]]]]]]]]]", "nesting deeper than 8"},
                                           BadJson{"\"\\q\"", "bad escape"}, BadJson{"\"a\nb\"", "control character"},
                                           BadJson{"01", "after the JSON"}, BadJson{"-", "malformed number"},
                                           BadJson{"1.", "malformed number"}, BadJson{"\"\\ud800\"", "surrogate"},
                                           BadJson{"tru", "unknown literal"}, BadJson{"\"abc", "unterminated"}));
