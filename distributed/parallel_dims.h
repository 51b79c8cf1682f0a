// The mesh degrees and this rank's place in it. Torch- and MPI-free, so `plan` and the
// pre-flight checks run anywhere.
//
// Layout: tp innermost (TP ranks adjacent, so on one node), then dp, then pp:
//   rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace shardtune {

// What the mesh must satisfy (from the config); 0 skips a check.
struct MeshRequirements {
  int64_t heads = 0;          // model.heads, divisible by tp
  int64_t depth = 0;          // model.depth, >= pp
  int64_t global_batch = 0;   // data.batch_size, divisible by dp * microbatches
  int64_t microbatches = 1;   // parallel.microbatches
  int64_t mlp_dim = 0;        // model.mlp_dim, divisible by tp (fc1 rows / fc2 columns split)
};

struct ParallelDims {
  int world = 1;
  int dp = 1;  // data-parallel replicas: world / (tp * pp)
  int tp = 1;  // tensor-parallel degree (heads and MLP split)
  int pp = 1;  // pipeline stages

  using Requirements = MeshRequirements;

  // dp = world / (tp * pp). Throws std::invalid_argument printing every degree and the
  // offending numbers ("parallel.tp=3 x parallel.pp=1 does not divide the world size 4
  // (world=4 tp=3 pp=1)"). Pure: every rank raises the same error before any collective.
  static ParallelDims make(int world, int tp, int pp, const Requirements& req = MeshRequirements());

  int tp_rank(int rank) const { return rank % tp; }
  int dp_rank(int rank) const { return (rank / tp) % dp; }
  int pp_rank(int rank) const { return rank / (tp * dp); }
  int rank_of(int pp_rank, int dp_rank, int tp_rank) const { return (pp_rank * dp + dp_rank) * tp + tp_rank; }
  std::string str() const;  // "world=8 dp=2 tp=2 pp=2"
};

}  // namespace shardtune
