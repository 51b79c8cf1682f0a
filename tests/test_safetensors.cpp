// safetensors: the writer's files read back bit-exact, and every malformed file named in
// the foundation issue is rejected with a message that names the file and the problem.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "io/safetensors.h"

namespace sf = shardtune::safetensors;

namespace {

std::string temp_path(const std::string& name) {
  return ::testing::TempDir() + "st_" + std::to_string(::getpid()) + "_" + name;
}

// A file: 8-byte length (or `len_override`), the header text, then `data_bytes` bytes.
std::string write_raw(const std::string& name, const std::string& header, size_t data_bytes,
                      long long len_override = -1) {
  std::string path = temp_path(name);
  std::ofstream out(path, std::ios::binary);
  uint64_t n = len_override >= 0 ? static_cast<uint64_t>(len_override) : header.size();
  for (int i = 0; i < 8; ++i) out.put(static_cast<char>((n >> (8 * i)) & 0xFF));
  out << header;
  out << std::string(data_bytes, '\0');
  return path;
}

std::string expect_rejected(const std::string& path) {
  try {
    sf::File f(path);
  } catch (const sf::FormatError& e) {
    std::string msg = e.what();
    EXPECT_EQ(msg.rfind(path, 0), 0u) << "message does not start with the file name: " << msg;
    return msg;
  }
  ADD_FAILURE() << "accepted " << path;
  return "";
}

}  // namespace

TEST(Safetensors, WriteReadRoundTrip) {
  std::vector<float> a = {1.5f, -2.0f, 3.25f, 0.0f, 7.0f, -1e-8f};
  std::vector<uint16_t> b = {0x3F80, 0xC000};  // bf16 1.0, -2.0
  std::vector<int64_t> c = {};
  std::string path = temp_path("roundtrip.safetensors");
  sf::write(path,
            {{"a", sf::DType::F32, {2, 3}, a.data(), a.size() * 4},
             {"b.x", sf::DType::BF16, {2}, b.data(), 4},
             {"empty", sf::DType::I64, {0, 5}, c.data(), 0}},
            {{"format", "pt"}});
  sf::File f(path);
  EXPECT_EQ(f.header().data_offset % 8, 0u);  // header padded so data is aligned
  EXPECT_EQ(f.header().metadata.at("format"), "pt");
  const auto* ta = f.find("a");
  ASSERT_NE(ta, nullptr);
  EXPECT_EQ(ta->dtype, sf::DType::F32);
  EXPECT_EQ(ta->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(std::memcmp(f.data(*ta), a.data(), 24), 0);
  const auto* tb = f.find("b.x");
  ASSERT_NE(tb, nullptr);
  EXPECT_EQ(std::memcmp(f.data(*tb), b.data(), 4), 0);
  ASSERT_NE(f.find("empty"), nullptr);
  EXPECT_EQ(f.find("empty")->numel(), 0);
  EXPECT_EQ(f.find("missing"), nullptr);
}

TEST(Safetensors, WriterRejectsDuplicatesAndWrongSizes) {
  float x = 0;
  EXPECT_THROW(sf::write(temp_path("dup"), {{"a", sf::DType::F32, {1}, &x, 4}, {"a", sf::DType::F32, {1}, &x, 4}}),
               sf::FormatError);
  EXPECT_THROW(sf::write(temp_path("size"), {{"a", sf::DType::F32, {2}, &x, 4}}), sf::FormatError);
}

TEST(Safetensors, FailedWriteLeavesOldFileIntact) {
  std::vector<float> a = {1, 2};
  std::string path = temp_path("keep.safetensors");
  sf::write(path, {{"a", sf::DType::F32, {2}, a.data(), 8}});
  EXPECT_THROW(sf::write(path, {{"a", sf::DType::F32, {3}, a.data(), 8}}), sf::FormatError);
  sf::File f(path);
  EXPECT_EQ(f.find("a")->shape, std::vector<int64_t>{2});
}

// Each malformed file of the issue's list: what it is, and the words its error must hold.
struct Malformed {
  const char* name;
  std::string header;
  size_t data_bytes;
  long long len_override;
  const char* message;
};
inline void PrintTo(const Malformed& c, std::ostream* os) { *os << c.name; }


class SafetensorsRejects : public ::testing::TestWithParam<Malformed> {};

TEST_P(SafetensorsRejects, WithMessage) {
  const auto& c = GetParam();
  std::string msg = expect_rejected(write_raw(c.name, c.header, c.data_bytes, c.len_override));
  EXPECT_NE(msg.find(c.message), std::string::npos) << msg;
}

const std::string kOk = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";

INSTANTIATE_TEST_SUITE_P(
    Cases, SafetensorsRejects,
    ::testing::Values(
        Malformed{"past_end", kOk, 8, 1000, "runs past the end of the file"},
        Malformed{"too_big", kOk, 8, (100ll << 20) + 1, "exceeds the 104857600-byte limit"},
        Malformed{"bad_json", R"({"a":{"dtype":"F32",)", 0, -1, "header is not valid JSON"},
        Malformed{"not_object", "[1,2]", 0, -1, "header is not a JSON object"},
        Malformed{"unknown_dtype", R"({"a":{"dtype":"F8","shape":[2],"data_offsets":[0,2]}})", 2, -1,
                  "unknown dtype 'F8'"},
        Malformed{"size_mismatch", R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8, -1,
                  "shape [3] x F32 needs 12 bytes but data_offsets [0, 8] hold 8"},
        Malformed{"out_of_range", R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 4, -1,
                  "out of range"},
        Malformed{"reversed", R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", 8, -1,
                  "end before they begin"},
        Malformed{"overlap",
                  R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                  12, -1, "overlap"},
        Malformed{"gap",
                  R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
                  12, -1, "gap in the data buffer"},
        Malformed{"trailing", kOk, 12, -1, "trailing bytes"},
        Malformed{"duplicate",
                  R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                  8, -1, "duplicate key \"a\""},
        Malformed{"negative_dim", R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8, -1,
                  "shape entry -2 is not a non-negative integer"},
        Malformed{"huge_shape",
                  R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", 8, -1,
                  "shape is too large"},
        Malformed{"missing_field", R"({"a":{"dtype":"F32","shape":[2]}})", 0, -1, "needs 'dtype', 'shape'"},
        Malformed{"bad_metadata", R"({"__metadata__":{"k":1}})", 0, -1, "__metadata__ value of 'k'"}),
    [](const ::testing::TestParamInfo<Malformed>& info) { return std::string(info.param.name); });

TEST(Safetensors, RejectsShortFile) {
  std::string path = temp_path("short");
  std::ofstream(path, std::ios::binary) << "abc";
  EXPECT_NE(expect_rejected(path).find("shorter than the 8-byte header length"), std::string::npos);
  std::string empty = temp_path("empty");
  std::ofstream(empty, std::ios::binary).flush();
  EXPECT_NE(expect_rejected(empty).find("file is 0 bytes"), std::string::npos);
}

TEST(Safetensors, RejectsMissingFile) {
  EXPECT_NE(expect_rejected(temp_path("does_not_exist")).find("cannot open"), std::string::npos);
}
