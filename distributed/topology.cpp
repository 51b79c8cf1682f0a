#include "distributed/topology.h"

#include <mpi.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <set>
#include <stdexcept>

#include "common/log.h"

namespace shardtune {

namespace {
constexpr int kHostChars = 64;  // host names are gathered in fixed slots (longer ones are cut)

void check(int rc, const char* what) {
  if (rc != MPI_SUCCESS) throw std::runtime_error(std::string("topology: ") + what + " failed");
}
}  // namespace

Topology discover_topology() {
  Topology t;
  int world = 1;
  check(MPI_Comm_rank(MPI_COMM_WORLD, &t.rank), "MPI_Comm_rank");
  check(MPI_Comm_size(MPI_COMM_WORLD, &world), "MPI_Comm_size");

  MPI_Comm node_comm;
  check(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, t.rank, MPI_INFO_NULL, &node_comm),
        "MPI_Comm_split_type(MPI_COMM_TYPE_SHARED)");
  check(MPI_Comm_rank(node_comm, &t.shared_local_rank), "MPI_Comm_rank(node)");
  check(MPI_Comm_size(node_comm, &t.local_size), "MPI_Comm_size(node)");
  // The node's lowest world rank names it (the key above orders the node by world rank).
  int leader = t.rank;
  check(MPI_Bcast(&leader, 1, MPI_INT, 0, node_comm), "MPI_Bcast(node leader)");
  MPI_Comm_free(&node_comm);

  const LaunchEnv env = launch_env_from_environment();
  if (!env.local_rank_from.empty()) {
    t.local_rank = env.local_rank;
    t.local_rank_from = env.local_rank_from;
  } else {
    t.local_rank = t.shared_local_rank;
    t.local_rank_from = "MPI_Comm_split_type";
  }

  char host[kHostChars] = {};
  gethostname(host, sizeof(host) - 1);
  t.host = host;

  std::vector<int> mine = {leader, t.local_rank}, all(2 * static_cast<size_t>(world));
  check(MPI_Allgather(mine.data(), 2, MPI_INT, all.data(), 2, MPI_INT, MPI_COMM_WORLD), "MPI_Allgather(placement)");
  std::vector<char> hosts(static_cast<size_t>(world) * kHostChars);
  check(MPI_Allgather(host, kHostChars, MPI_CHAR, hosts.data(), kHostChars, MPI_CHAR, MPI_COMM_WORLD),
        "MPI_Allgather(host names)");

  std::set<int> leaders;
  for (int r = 0; r < world; ++r) leaders.insert(all[2 * r]);
  std::vector<int> ordered(leaders.begin(), leaders.end());
  t.nodes = static_cast<int>(ordered.size());
  for (int r = 0; r < world; ++r) {
    const int node = static_cast<int>(std::lower_bound(ordered.begin(), ordered.end(), all[2 * r]) - ordered.begin());
    t.node_of_rank.push_back(node);
    t.local_rank_of_rank.push_back(all[2 * r + 1]);
    const char* h = &hosts[static_cast<size_t>(r) * kHostChars];
    t.host_of_rank.emplace_back(h, strnlen(h, kHostChars));
  }
  t.node = t.node_of_rank[t.rank];
  return t;
}

std::vector<std::string> tp_groups_spanning_nodes(const ParallelDims& dims, const std::vector<int>& node_of_rank) {
  if (static_cast<int>(node_of_rank.size()) != dims.world)
    throw std::invalid_argument("tp_groups_spanning_nodes: " + std::to_string(node_of_rank.size()) +
                                " node indices for " + dims.str());
  std::vector<std::string> out;
  for (int p = 0; p < dims.pp; ++p)
    for (int d = 0; d < dims.dp; ++d) {
      std::string ranks, nodes;
      std::set<int> seen;
      for (int t = 0; t < dims.tp; ++t) {
        const int r = dims.rank_of(p, d, t);
        ranks += (t ? "," : "") + std::to_string(r);
        if (seen.insert(node_of_rank[r]).second) nodes += (nodes.empty() ? "" : ",") + std::to_string(node_of_rank[r]);
      }
      if (seen.size() > 1)
        out.push_back("tp group of dp " + std::to_string(d) + " pp " + std::to_string(p) + " (ranks " + ranks +
                      ") spans nodes " + nodes);
    }
  return out;
}

std::string placement_line(const Topology& t, const ParallelDims& dims, int rank) {
  return "rank " + std::to_string(rank) + ": node " + std::to_string(t.node_of_rank.at(rank)) + " (host " +
         t.host_of_rank.at(rank) + "), local rank " + std::to_string(t.local_rank_of_rank.at(rank)) + ", tp " +
         std::to_string(dims.tp_rank(rank)) + " dp " + std::to_string(dims.dp_rank(rank)) + " pp " +
         std::to_string(dims.pp_rank(rank));
}

void log_topology(const Topology& t, const ParallelDims& dims) {
  if (t.local_rank != t.shared_local_rank)
    spdlog::warn("local rank {} from {} differs from MPI's rank {} on this node ({} ranks there)", t.local_rank,
                 t.local_rank_from, t.shared_local_rank, t.local_size);
  if (t.rank != 0) return;
  const auto level = dims.world > 1 ? spdlog::level::info : spdlog::level::debug;
  spdlog::log(level, "placement: {} rank(s) on {} node(s), local rank from {}", dims.world, t.nodes, t.local_rank_from);
  for (int r = 0; r < dims.world; ++r) spdlog::log(level, "{}", placement_line(t, dims, r));
  for (const auto& g : tp_groups_spanning_nodes(dims, t.node_of_rank))
    spdlog::warn("{}: every tensor-parallel all-reduce crosses the network (place consecutive ranks on one node, "
                 "e.g. mpirun --map-by ppr:N:node)", g);
}

}  // namespace shardtune
