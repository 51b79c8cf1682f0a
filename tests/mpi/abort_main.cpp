// A job where one rank fails while the others wait in a collective: the failing rank
// logs its error and ends the whole job (MPI_Abort), so nobody hangs.
// usage: mpiexec -n N shardtune_abort_test FAILING_RANK
#include <mpi.h>

#include <chrono>
#include <cstdlib>
#include <iostream>
#include <stdexcept>
#include <string>
#include <thread>

#include "distributed/mesh.h"

int main(int argc, char** argv) {
  shardtune::MpiRuntime mpi(&argc, &argv);
  const int failing = argc > 1 ? std::atoi(argv[1]) : 1;
  try {
    if (mpi.rank() == failing) {
      std::this_thread::sleep_for(std::chrono::milliseconds(300));
      throw std::runtime_error("injected failure");
    }
    MPI_Barrier(MPI_COMM_WORLD);  // the healthy ranks wait here for the failed one
    std::cout << "rank " << mpi.rank() << " passed the barrier (should not happen)\n";
    return 0;
  } catch (const std::exception& e) {
    // One write: std::cerr is unbuffered, so piecewise `<<` makes one write a piece, and mpiexec's
    // abort notice can land between them ("[rank " and "1] error: ..." apart: a failed check).
    const std::string line = "[rank " + std::to_string(mpi.rank()) + "] error: " + e.what() + "; aborting the job\n";
    std::cerr << line << std::flush;
    shardtune::MpiRuntime::abort_job(3);
  }
}
