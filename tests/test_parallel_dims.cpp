// Mesh arithmetic and validation: layout (tp innermost, then dp, then pp) and every
// violation's message with all the degrees in it.
#include <gtest/gtest.h>

#include "distributed/parallel_dims.h"

using shardtune::ParallelDims;

TEST(ParallelDims, LayoutIsTpInnermostThenDpThenPp) {
  ParallelDims d = ParallelDims::make(8, 2, 2);
  EXPECT_EQ(d.dp, 2);
  for (int r = 0; r < 8; ++r) {
    EXPECT_EQ(d.rank_of(d.pp_rank(r), d.dp_rank(r), d.tp_rank(r)), r);
  }
  EXPECT_EQ(d.tp_rank(5), 1);
  EXPECT_EQ(d.dp_rank(5), 0);
  EXPECT_EQ(d.pp_rank(5), 1);
  EXPECT_EQ(d.dp_rank(2), 1);
  EXPECT_EQ(d.str(), "world=8 dp=2 tp=2 pp=2");
}

struct BadMesh {
  const char* name;
  int world, tp, pp;
  ParallelDims::Requirements req;
  const char* message;
};
inline void PrintTo(const BadMesh& c, std::ostream* os) { *os << c.name; }

class ParallelDimsRejects : public ::testing::TestWithParam<BadMesh> {};

TEST_P(ParallelDimsRejects, WithEveryDegree) {
  const auto& c = GetParam();
  try {
    ParallelDims::make(c.world, c.tp, c.pp, c.req);
    FAIL() << "accepted";
  } catch (const std::invalid_argument& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find(c.message), std::string::npos) << msg;
    EXPECT_NE(msg.find("(world=" + std::to_string(c.world) + " tp=" + std::to_string(c.tp) + " pp=" + std::to_string(c.pp) + ")"),
              std::string::npos)
        << msg;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, ParallelDimsRejects,
    ::testing::Values(
        BadMesh{"not_dividing", 4, 3, 1, {}, "parallel.tp=3 x parallel.pp=1 = 3 does not divide the world size 4"},
        BadMesh{"heads", 4, 4, 1, {6, 12, 0, 1}, "model.heads=6 is not divisible by parallel.tp=4"},
        BadMesh{"depth", 4, 1, 4, {12, 2, 0, 1}, "model.depth=2 is less than parallel.pp=4"},
        BadMesh{"mlp_dim", 4, 4, 1, {12, 12, 0, 1, 3070}, "model.mlp_dim=3070 is not divisible by parallel.tp=4"},
        BadMesh{"batch", 8, 2, 1, {12, 12, 30, 4}, "data.batch_size=30 is not divisible by dp=4 x parallel.microbatches=4 = 16"},
        BadMesh{"zero_tp", 2, 0, 1, {}, "parallel.tp=0 must be positive"},
        BadMesh{"microbatches", 2, 1, 1, {12, 12, 8, 0}, "parallel.microbatches=0 must be positive"}),
    [](const ::testing::TestParamInfo<BadMesh>& info) { return std::string(info.param.name); });
