// Placement: the node and local rank that discover_topology() finds agree with what the
// launcher says (mpiexec on one machine: one node, OMPI_COMM_WORLD_LOCAL_RANK), the
// shared-memory fallback gives the same answer without the launcher's variables, and a tp
// group split over nodes is named.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdlib>
#include <map>
#include <string>

#include "distributed/parallel_dims.h"
#include "distributed/topology.h"

using namespace shardtune;

namespace {
int world_size() {
  int n = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

// Unsets the launcher's local-rank variables for its lifetime.
struct WithoutLocalRankVariables {
  std::map<std::string, std::string> saved;
  WithoutLocalRankVariables() {
    for (const char* n : {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"})
      if (const char* v = std::getenv(n)) saved[n] = v, unsetenv(n);
  }
  ~WithoutLocalRankVariables() {
    for (const auto& [k, v] : saved) setenv(k.c_str(), v.c_str(), 1);
  }
};
}  // namespace

TEST(Topology, AgreesWithTheLauncherOnOneMachine) {
  const Topology t = discover_topology();
  const int n = world_size();
  ASSERT_EQ(static_cast<int>(t.node_of_rank.size()), n);
  ASSERT_EQ(static_cast<int>(t.local_rank_of_rank.size()), n);
  EXPECT_EQ(t.nodes, 1);  // mpiexec here starts every rank on this machine
  EXPECT_EQ(t.node, 0);
  EXPECT_EQ(t.local_size, n);
  EXPECT_EQ(t.shared_local_rank, t.rank);
  EXPECT_EQ(t.local_rank_of_rank[t.rank], t.local_rank);
  EXPECT_EQ(t.host_of_rank[t.rank], t.host);
  if (const char* v = std::getenv("OMPI_COMM_WORLD_LOCAL_RANK")) {
    EXPECT_EQ(t.local_rank_from, "OMPI_COMM_WORLD_LOCAL_RANK");
    EXPECT_EQ(t.local_rank, std::atoi(v));
    EXPECT_EQ(t.shared_local_rank, std::atoi(v));
  }
  if (const char* v = std::getenv("OMPI_COMM_WORLD_LOCAL_SIZE")) {
    EXPECT_EQ(t.local_size, std::atoi(v));
  }
  const ParallelDims dims = ParallelDims::make(n, 1, 1);
  EXPECT_TRUE(tp_groups_spanning_nodes(dims, t.node_of_rank).empty());
  EXPECT_EQ(placement_line(t, dims, t.rank), "rank " + std::to_string(t.rank) + ": node 0 (host " + t.host +
                                                 "), local rank " + std::to_string(t.local_rank) + ", tp 0 dp " +
                                                 std::to_string(t.rank) + " pp 0");
}

TEST(Topology, SharedMemoryFallbackWithoutLauncherVariables) {
  const Topology with = discover_topology();
  Topology without;
  {
    WithoutLocalRankVariables unset;
    without = discover_topology();
  }
  EXPECT_EQ(without.local_rank_from, "MPI_Comm_split_type");
  EXPECT_EQ(without.local_rank, with.local_rank);
  EXPECT_EQ(without.node_of_rank, with.node_of_rank);
  EXPECT_EQ(without.local_rank_of_rank, with.local_rank_of_rank);
}

TEST(Topology, TpGroupsSpanningNodesAreNamed) {
  const ParallelDims tp2 = ParallelDims::make(4, 2, 1);
  EXPECT_TRUE(tp_groups_spanning_nodes(tp2, {0, 0, 1, 1}).empty());  // --map-by ppr:2:node
  // --map-by node (round robin): every tp group crosses the nodes.
  const auto spans = tp_groups_spanning_nodes(tp2, {0, 1, 0, 1});
  ASSERT_EQ(spans.size(), 2u);
  EXPECT_EQ(spans[0], "tp group of dp 0 pp 0 (ranks 0,1) spans nodes 0,1");
  EXPECT_EQ(spans[1], "tp group of dp 1 pp 0 (ranks 2,3) spans nodes 0,1");
  // tp 2 x pp 2 over 3 nodes of 3, 3 and 2 slots: only the group of ranks 2,3 is split.
  const ParallelDims tp2pp2 = ParallelDims::make(8, 2, 2);
  const auto split = tp_groups_spanning_nodes(tp2pp2, {0, 0, 0, 1, 1, 1, 2, 2});
  ASSERT_EQ(split.size(), 1u);
  EXPECT_EQ(split[0], "tp group of dp 1 pp 0 (ranks 2,3) spans nodes 0,1");
  EXPECT_THROW(tp_groups_spanning_nodes(tp2, {0, 0}), std::invalid_argument);
}
