// JSON is nlohmann/json; what ShardTune adds on top (duplicate keys and deep nesting rejected,
// typed reads that refuse silent conversions, errors naming the file) is checked here. The
// parser is the first thing untrusted checkpoint bytes reach: it must accept RFC 8259
// documents exactly and reject everything else with a message.
#include <gtest/gtest.h>
#include <unistd.h>

#include <fstream>

#include "io/strict_json.h"

using namespace shardtune;
using json::Json;
using json::parse;
using json::ParseError;

TEST(Json, ParsesEveryKind) {
  Json v = parse(R"({"a": [1, -2.5e3, true, false, null], "s": "x\u00e9\n\"", "o": {}})");
  ASSERT_TRUE(v.is_object());
  const Json& a = v["a"];
  EXPECT_EQ(json::to_int64(a[0]), 1);
  EXPECT_DOUBLE_EQ(json::to_double(a[1]), -2500.0);
  EXPECT_TRUE(json::to_bool(a[2]));
  EXPECT_FALSE(json::to_bool(a[3]));
  EXPECT_TRUE(a[4].is_null());
  EXPECT_EQ(json::to_string(v["s"]), "x\xc3\xa9\n\"");
  EXPECT_TRUE(v["o"].empty());
}

TEST(Json, KeepsLargeIntegersExact) {
  Json v = parse("[18446744073709551615, 9007199254740993]");
  EXPECT_EQ(json::to_uint64(v[0]), 18446744073709551615ull);
  EXPECT_EQ(json::to_int64(v[1]), 9007199254740993ll);
  EXPECT_THROW(json::to_uint64(parse("-1")), std::runtime_error);
  EXPECT_THROW(json::to_uint64(parse("1.5")), std::runtime_error);
  EXPECT_THROW(json::to_uint64(parse("1e3")), std::runtime_error);
  EXPECT_THROW(json::to_uint64(parse("18446744073709551616")), std::runtime_error);  // parsed as a double
  EXPECT_THROW(json::to_int64(parse("18446744073709551615")), std::runtime_error);
  EXPECT_THROW(json::to_int64(parse("2.5")), std::runtime_error);  // nlohmann's get<int64_t> would give 2
  EXPECT_THROW(json::to_string(parse("1")), std::runtime_error);
  EXPECT_THROW(json::to_bool(parse("0")), std::runtime_error);
  try {
    json::at(parse("{}"), "step");
    FAIL();
  } catch (const std::runtime_error& e) {
    EXPECT_EQ(std::string(e.what()), "missing \"step\"");
  }
}

TEST(Json, DumpRoundTripsInInsertionOrder) {
  const std::string text = R"({"b":[1,2,{"c":"d\\e"}],"a":true,"n":null})";
  EXPECT_EQ(json::dump(parse(text)), text);  // insertion order is kept
  Json obj;
  obj["x"] = 1;
  obj["y"] = "z";
  obj["x"] = 2;  // replaces
  EXPECT_EQ(json::dump(obj), R"({"x":2,"y":"z"})");
  EXPECT_EQ(json::dump(parse(json::dump(obj, 2))), json::dump(obj));
  // A file name that is not UTF-8 is written, not thrown on.
  EXPECT_EQ(json::dump(Json("a\xff")), "\"a\xef\xbf\xbd\"");
}

TEST(Json, ReadFileNamesTheFile) {
  const std::string path = ::testing::TempDir() + "bad_" + std::to_string(::getpid()) + ".json";
  std::ofstream(path) << "{\"a\": 1,}";
  try {
    json::read_file(path);
    FAIL();
  } catch (const ParseError& e) {
    EXPECT_NE(std::string(e.what()).find(path + ": malformed JSON: parse error at line 1, column 9"), std::string::npos)
        << e.what();
  }
  EXPECT_THROW(json::read_file(path + ".missing"), std::runtime_error);
}

struct BadJson {
  const char* text;
  const char* message;
};
inline void PrintTo(const BadJson& c, std::ostream* os) { *os << json::dump(Json(c.text)); }

class JsonRejects : public ::testing::TestWithParam<BadJson> {};

TEST_P(JsonRejects, WithMessage) {
  try {
    parse(GetParam().text, 8);
    FAIL() << "accepted: " << GetParam().text;
  } catch (const ParseError& e) {
    EXPECT_NE(std::string(e.what()).find(GetParam().message), std::string::npos) << e.what();
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, JsonRejects,
    ::testing::Values(BadJson{"", "unexpected end of input"}, BadJson{"{", "expected string literal"},
                      BadJson{R"({"a":1,"a":2})", "duplicate key \"a\""},
                      BadJson{R"({"o":{"k":1,"k":2}})", "duplicate key \"k\""},
                      BadJson{"[1,]", "unexpected ']'"}, BadJson{"[1] x", "expected end of input"},
                      BadJson{"[[[[[[[[[1]]]]]]]]]", "nesting deeper than 8"},
                      BadJson{R"({"a":{"b":{"c":{"d":{"e":{"f":{"g":{"h":{}}}}}}}}})", "nesting deeper than 8"},
                      BadJson{"\"\\q\"", "forbidden character after backslash"},
                      BadJson{"\"a\nb\"", "control character U+000A"}, BadJson{"01", "expected end of input"},
                      BadJson{"-", "expected digit after '-'"}, BadJson{"1.", "expected digit after '.'"},
                      BadJson{"\"\\ud800\"", "surrogate"}, BadJson{"tru", "invalid literal"},
                      BadJson{"\"abc", "missing closing quote"}, BadJson{"\"\xff\"", "ill-formed UTF-8"},
                      BadJson{"[1e999]", "number overflow"}, BadJson{R"({"shape":[1e400]})", "number overflow"}));

TEST(Json, AcceptsNestingUpToTheLimit) {
  EXPECT_NO_THROW(parse("[[[[[[[[1]]]]]]]]", 8));
  EXPECT_NO_THROW(parse(R"({"a":[1,{"a":2}],"b":{"a":3}})"));  // the same key in different objects
}
