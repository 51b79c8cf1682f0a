// The run configuration: INI file (Boost.Program_options syntax, [section] key = value)
// plus --section.key VALUE overrides on the command line, which win. Unknown keys and
// unparsable values are UsageErrors that name the key.
#pragma once

#include <boost/program_options/options_description.hpp>
#include <boost/program_options/variables_map.hpp>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "models/vit_config.h"
#include "peft/peft_config.h"
#include "trainer/trainer.h"

namespace shardtune {

// A mistake in how the program was called (exit code 2), as opposed to a runtime failure (1).
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct ParallelConfig {
  int tp = 1, pp = 1;          // dp = world / (tp * pp)
  int64_t microbatches = 1;
  std::string schedule = "1f1b";  // gpipe | 1f1b
  double bucket_mb = 25.0;     // gradient-sync bucket size
  std::string device = "auto";   // auto | cpu | cuda (common/device.h has the rules)
  std::string backend = "auto";  // auto | mpi | nccl
};

struct RunConfig {
  ViTConfig model;
  std::string checkpoint;  // model.checkpoint: safetensors file, index.json or directory
  bool load_head = true;   // model.load_head: false = the checkpoint's head is not loaded
  uint64_t seed = 0;       // train.seed: initialisation of the backbone and PEFT
  PeftConfig peft;
  DataConfig data;
  TrainConfig train;
  OutputConfig output;
  ParallelConfig parallel;

  RunSpec spec() const;  // what the trainer needs
};

// Every config key, as options named "section.key".
boost::program_options::options_description config_key_options();

// Parses argv (after the subcommand) against `command_options` + the config keys, then
// the --config file if given. Throws UsageError on any problem. `vm` receives everything.
void parse_command_line(const std::vector<std::string>& args,
                        const boost::program_options::options_description& command_options,
                        boost::program_options::variables_map& vm);

// Builds and validates the RunConfig from the parsed values: model.arch picks a preset
// (or "vit" for explicit dims), then every other model.* key overrides it.
RunConfig run_config_from(const boost::program_options::variables_map& vm);

// The config as an INI text, for the record in outputs.
std::string to_ini(const RunConfig& c);

}  // namespace shardtune
