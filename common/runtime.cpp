#include "common/runtime.h"

#include <ATen/Parallel.h>
#include <malloc.h>
#include <sched.h>

#include <algorithm>
#include <cstdlib>

namespace shardtune {

int configure_runtime(int local_ranks) {
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);

  int threads = 0;
  if (const char* v = std::getenv("OMP_NUM_THREADS")) threads = std::atoi(v);
  if (threads <= 0) {
    cpu_set_t set;
    int cores = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 1;
    threads = std::max(1, cores / std::max(1, local_ranks));
  }
  at::set_num_threads(threads);
  return threads;
}

}  // namespace shardtune
