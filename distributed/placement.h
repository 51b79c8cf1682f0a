// A rank's device and collective backend (parallel.device, parallel.backend), decided on every
// rank before the mesh exists, by the rules of common/device.h over this machine's facts.
#pragma once

#include <string>

#include "common/device.h"
#include "distributed/topology.h"

namespace shardtune {

struct Placement {
  LocalRank local;
  DeviceChoice device;
  Backend backend = Backend::Mpi;
  std::string nccl;  // the NCCL library and version in use, empty with the MPI backend
};

// Collective over MPI_COMM_WORLD (all ranks call it, with the Topology they discovered).
// Every rank decides; then the ranks agree: when one rank's choice fails every rank throws
// std::invalid_argument (that rank its own message, the others naming it), and ranks that
// chose different backends or device kinds are an error too, before any tensor moves. With a
// CUDA device the calling thread's current device is set to it.
Placement place_rank(const std::string& device, const std::string& backend, const Topology& topo);

}  // namespace shardtune
