// Where each rank runs: its node, its local rank on that node, and whether the mesh keeps
// every tensor-parallel group inside one node. Torch-free; MPI only.
//
// A "node" is what MPI calls shared memory (MPI_Comm_split_type(MPI_COMM_TYPE_SHARED)):
// one host, or one Open MPI daemon's ranks (two network namespaces on one machine are two
// nodes although gethostname() is the same in both). Nodes are numbered in the order of
// their lowest world rank. The local rank comes from the launcher where it sets one
// (OMPI_COMM_WORLD_LOCAL_RANK, MPI_LOCALRANKID, SLURM_LOCALID, the order of
// launch_env_from_environment) and from the rank within the node otherwise.
#pragma once

#include <string>
#include <vector>

#include "distributed/parallel_dims.h"

namespace shardtune {

struct Topology {
  int rank = 0;                  // this rank in MPI_COMM_WORLD
  int node = 0;                  // this rank's node index
  int nodes = 1;                 // how many nodes the job spans
  int local_rank = 0;            // this rank's place on its node
  int local_size = 1;            // ranks on this node
  int shared_local_rank = 0;     // rank within MPI_COMM_TYPE_SHARED (equals local_rank unless the launcher disagrees)
  std::string local_rank_from;   // the variable local_rank came from, or "MPI_Comm_split_type"
  std::string host;              // gethostname()
  // Every rank's node, local rank and host name, indexed by world rank (same on all ranks).
  std::vector<int> node_of_rank, local_rank_of_rank;
  std::vector<std::string> host_of_rank;
};

// Collective over MPI_COMM_WORLD: every rank calls it (after MPI_Init).
Topology discover_topology();

// The tp groups of `dims` whose ranks are on more than one node, one description each:
// "tp group of dp 0 pp 0 (ranks 0,1) spans nodes 0,1". Empty when all are inside a node.
std::vector<std::string> tp_groups_spanning_nodes(const ParallelDims& dims, const std::vector<int>& node_of_rank);

// One line per rank: "rank 1: node 0 (host h), local rank 1, tp 1 dp 0 pp 0".
std::string placement_line(const Topology& t, const ParallelDims& dims, int rank);

// Rank 0 logs every rank's placement_line (info when the world has several ranks, debug
// alone) and warns once per tp group that spans nodes: a real cluster pays for it on every
// tensor-parallel all-reduce. Every rank warns when its launcher's local rank disagrees with
// MPI's. Call on every rank after the mesh is made.
void log_topology(const Topology& t, const ParallelDims& dims);

}  // namespace shardtune
