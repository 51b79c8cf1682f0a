#include "distributed/parallel_dims.h"

namespace shardtune {

std::string ParallelDims::str() const {
  return "world=" + std::to_string(world) + " dp=" + std::to_string(dp) + " tp=" + std::to_string(tp) +
         " pp=" + std::to_string(pp);
}

ParallelDims ParallelDims::make(int world, int tp, int pp, const Requirements& req) {
  const std::string degrees =
      " (world=" + std::to_string(world) + " tp=" + std::to_string(tp) + " pp=" + std::to_string(pp) + ")";
  auto fail = [&](const std::string& what) { throw std::invalid_argument(what + degrees); };
  if (world < 1) fail("world size " + std::to_string(world) + " must be positive");
  if (tp < 1) fail("parallel.tp=" + std::to_string(tp) + " must be positive");
  if (pp < 1) fail("parallel.pp=" + std::to_string(pp) + " must be positive");
  if (world % (tp * pp) != 0)
    fail("parallel.tp=" + std::to_string(tp) + " x parallel.pp=" + std::to_string(pp) + " = " +
         std::to_string(tp * pp) + " does not divide the world size " + std::to_string(world));
  ParallelDims d;
  d.world = world;
  d.tp = tp;
  d.pp = pp;
  d.dp = world / (tp * pp);
  if (req.heads > 0 && req.heads % tp != 0)
    fail("model.heads=" + std::to_string(req.heads) + " is not divisible by parallel.tp=" + std::to_string(tp));
  if (req.mlp_dim > 0 && req.mlp_dim % tp != 0)
    fail("model.mlp_dim=" + std::to_string(req.mlp_dim) + " is not divisible by parallel.tp=" + std::to_string(tp));
  if (req.depth > 0 && req.depth < pp)
    fail("model.depth=" + std::to_string(req.depth) + " is less than parallel.pp=" + std::to_string(pp) +
         " (every stage needs a block)");
  if (req.microbatches < 1) fail("parallel.microbatches=" + std::to_string(req.microbatches) + " must be positive");
  if (req.global_batch > 0 && req.global_batch % (d.dp * req.microbatches) != 0)
    fail("data.batch_size=" + std::to_string(req.global_batch) + " is not divisible by dp=" + std::to_string(d.dp) +
         " x parallel.microbatches=" + std::to_string(req.microbatches) + " = " +
         std::to_string(d.dp * req.microbatches));
  return d;
}

}  // namespace shardtune
