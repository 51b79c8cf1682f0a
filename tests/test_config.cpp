// Config: INI file + --section.key overrides (the command line wins), presets with
// overrides, and usage errors that name the offending key or value.
#include <gtest/gtest.h>

#include <boost/program_options/value_semantic.hpp>
#include <fstream>

#include "launch/config.h"

using namespace shardtune;
namespace po = boost::program_options;

namespace {

po::options_description command_options() {
  po::options_description d;
  d.add_options()("config", po::value<std::string>())("out", po::value<std::string>());
  return d;
}

std::string write_ini(const std::string& name, const std::string& text) {
  std::string path = ::testing::TempDir() + "cfg_" + std::to_string(::getpid()) + "_" + name + ".ini";
  std::ofstream(path) << text;
  return path;
}

RunConfig parse(const std::vector<std::string>& args) {
  po::variables_map vm;
  parse_command_line(args, command_options(), vm);
  return run_config_from(vm);
}

std::string usage_error(const std::vector<std::string>& args) {
  try {
    parse(args);
  } catch (const UsageError& e) {
    return e.what();
  }
  ADD_FAILURE() << "accepted";
  return "";
}

}  // namespace

TEST(Config, IniWithCommandLineOverrides) {
  std::string ini = write_ini("ok", "[model]\narch = vit_small_patch16_224\nnum_classes = 10\nglobal_pool = avg\n"
                                    "qkv_bias = false\n[train]\nseed = 5\n");
  RunConfig rc = parse({"--config", ini, "--model.num_classes", "3", "--model.depth", "2"});
  EXPECT_EQ(rc.model.arch, "vit_small_patch16_224");
  EXPECT_EQ(rc.model.dim, 384);          // from the preset
  EXPECT_EQ(rc.model.depth, 2);          // command line
  EXPECT_EQ(rc.model.num_classes, 3);    // command line beats the file
  EXPECT_EQ(rc.model.global_pool, "avg");
  EXPECT_FALSE(rc.model.qkv_bias);
  EXPECT_EQ(rc.seed, 5u);
}

TEST(Config, LoraPatternsKeepTheirOrder) {
  const RunConfig rc = parse({"--peft.rank_pattern", "3.attn.qkv:16, qkv:4", "--peft.alpha_pattern", "fc1:2.5",
                              "--peft.rslora", "true", "--peft.init_adapter", "some/dir"});
  EXPECT_EQ(rc.peft.rank_pattern, (std::vector<std::pair<std::string, int64_t>>{{"3.attn.qkv", 16}, {"qkv", 4}}));
  EXPECT_EQ(rc.peft.alpha_pattern, (std::vector<std::pair<std::string, double>>{{"fc1", 2.5}}));
  EXPECT_TRUE(rc.peft.rslora);
  EXPECT_EQ(rc.peft.init_adapter, "some/dir");
}

TEST(Config, ToIniRoundTrips) {
  RunConfig rc = parse({"--model.arch", "vit", "--model.dim", "48", "--model.heads", "3", "--model.layer_scale", "0.25"});
  RunConfig back = parse({"--config", write_ini("roundtrip", to_ini(rc))});
  EXPECT_EQ(back.model.dim, 48);
  EXPECT_EQ(back.model.heads, 3);
  EXPECT_DOUBLE_EQ(back.model.layer_scale, 0.25);
  EXPECT_EQ(back.model.param_count(), rc.model.param_count());
}

struct BadArgs {
  const char* name;
  std::vector<std::string> args;
  std::string ini;  // written to a file and passed as --config when not empty
  const char* message;
};
inline void PrintTo(const BadArgs& c, std::ostream* os) { *os << c.name; }


class ConfigRejects : public ::testing::TestWithParam<BadArgs> {};

TEST_P(ConfigRejects, NamingTheKey) {
  auto args = GetParam().args;
  if (!GetParam().ini.empty()) {
    args.push_back("--config");
    args.push_back(write_ini(GetParam().name, GetParam().ini));
  }
  std::string msg = usage_error(args);
  EXPECT_NE(msg.find(GetParam().message), std::string::npos) << msg;
}

INSTANTIATE_TEST_SUITE_P(
    Cases, ConfigRejects,
    ::testing::Values(BadArgs{"unknown_cli_key", {"--model.colour", "red"}, "", "model.colour"},
                      BadArgs{"unknown_ini_key", {}, "[model]\ncolour = red\n", "model.colour"},
                      BadArgs{"bad_int", {"--model.dim", "wide"}, "", "model.dim"},
                      BadArgs{"bad_bool", {}, "[model]\nqkv_bias = maybe\n", "model.qkv_bias"},
                      BadArgs{"unknown_arch", {"--model.arch", "vit_colossal"}, "", "model.arch=vit_colossal"},
                      BadArgs{"heads", {"--model.heads", "5"}, "", "model.heads=5 does not divide model.dim=768"},
                      BadArgs{"pool", {"--model.global_pool", "max"}, "", "model.global_pool=max"},
                      BadArgs{"missing_file", {"--config", "/nonexistent/x.ini"}, "", "/nonexistent/x.ini"},
                      BadArgs{"rank_pattern_item", {"--peft.rank_pattern", "fc1:4,qkv"}, "",
                              "peft.rank_pattern=fc1:4,qkv: not PATTERN:NUMBER items (peft.rank_pattern=fc1:4,qkv: 'qkv' is not PATTERN:VALUE)"},
                      BadArgs{"alpha_pattern_value", {"--peft.alpha_pattern", "fc1:big"}, "",
                              "peft.alpha_pattern=fc1:big: not PATTERN:NUMBER items"}),
    [](const ::testing::TestParamInfo<BadArgs>& info) { return std::string(info.param.name); });
