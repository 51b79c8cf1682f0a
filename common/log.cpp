#include "common/log.h"

#include <spdlog/sinks/stdout_color_sinks.h>

#include <cstdlib>
#include <stdexcept>

namespace shardtune {

namespace {
int env_int(std::initializer_list<const char*> names, int fallback, std::string* from = nullptr) {
  for (const char* n : names)
    if (const char* v = std::getenv(n)) {
      if (from) *from = n;
      return std::atoi(v);
    }
  return fallback;
}
}  // namespace

LaunchEnv launch_env_from_environment() {
  LaunchEnv e;
  e.rank = env_int({"OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID"}, 0);
  e.world_size = env_int({"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS"}, 1);
  e.local_rank = env_int({"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"}, 0, &e.local_rank_from);
  e.local_size = env_int({"OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE"}, 1);
  return e;
}

void init_logging(int rank, const std::string& level) {
  auto lvl = spdlog::level::from_str(level);
  if (lvl == spdlog::level::off && level != "off")
    throw std::invalid_argument("--log-level=" + level + " is not one of trace, debug, info, warn, error, critical, off");
  auto logger = spdlog::stderr_color_mt("shardtune");
  logger->set_pattern("[%Y-%m-%d %H:%M:%S.%e] [rank " + std::to_string(rank) + "] [%^%l%$] %v");
  logger->set_level(rank == 0 ? lvl : std::max(lvl, spdlog::level::warn));
  spdlog::set_default_logger(logger);
}

}  // namespace shardtune
