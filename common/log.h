// Rank-aware logging through spdlog: every line carries the rank; rank 0 prints progress
// (info and below), every rank prints warnings and errors.
#pragma once

#include <spdlog/spdlog.h>

#include <string>

namespace shardtune {

// The process's rank and world size as the launcher set them (Open MPI, PMI, Slurm), read
// from the environment before MPI is initialised; 0 and 1 when run alone.
struct LaunchEnv {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  int local_size = 1;  // ranks on this node
  std::string local_rank_from;  // the variable local_rank was read from; empty when none was set
};
LaunchEnv launch_env_from_environment();

// Sets the default logger: "[time] [rank R] [level] message". `level` is one of trace,
// debug, info, warn, error, critical, off; ranks other than 0 show warnings and above only.
// Throws std::invalid_argument naming the level when it is unknown.
void init_logging(int rank, const std::string& level = "info");

}  // namespace shardtune
