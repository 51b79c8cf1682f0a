// The NCCL group's bootstrap and the placement's agreement, on the CPU machines: a stand-in
// libnccl.so.2 / libcudart (tests/fake_gpu) records what ncclCommInitRank receives, so the
// unique id's trip from the group's rank 0 over MPI_Bcast, the failures of either NCCL call
// (every rank throws, none waits) and the CPU tensors' route through the group's MPI
// communicator are checked under mpiexec -n 1, 2 and 4.
#include <dlfcn.h>
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdlib>
#include <cstring>

#include "common/torch_device.h"
#include "distributed/nccl_api.h"
#include "distributed/nccl_process_group.h"
#include "distributed/placement.h"

using namespace shardtune;

namespace {

struct FakeGpu {
  std::unique_ptr<NcclApi> nccl;
  std::unique_ptr<CudaApi> cuda;
  int (*last_init)(ncclUniqueId*, int*, int*) = nullptr;
  FakeGpu() {
    std::string error;
    nccl = load_nccl({FAKE_NCCL}, &error);
    cuda = load_cudart({FAKE_CUDART}, &error);
    void* lib = dlopen(FAKE_NCCL, RTLD_NOW | RTLD_NOLOAD);
    if (lib) last_init = reinterpret_cast<decltype(last_init)>(dlsym(lib, "fake_nccl_last_init"));
  }
};

MPI_Comm dup_world() {
  MPI_Comm c;
  MPI_Comm_dup(MPI_COMM_WORLD, &c);
  return c;
}

std::unique_ptr<NcclProcessGroup> make_group(const FakeGpu& g) {
  return std::make_unique<NcclProcessGroup>(dup_world(), "world", 0, *g.nccl, *g.cuda, [] { return nullptr; });
}

// Sets FAKE_NCCL_FAIL for its lifetime.
struct FailOn {
  explicit FailOn(const char* what) { setenv("FAKE_NCCL_FAIL", what, 1); }
  ~FailOn() { unsetenv("FAKE_NCCL_FAIL"); }
};

}  // namespace

TEST(NcclBootstrap, EveryRankGetsRankZerosUniqueId) {
  FakeGpu g;
  ASSERT_NE(g.nccl, nullptr);
  ASSERT_NE(g.cuda, nullptr);
  ASSERT_NE(g.last_init, nullptr);
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  {
    auto pg = make_group(g);
    ncclUniqueId id{};
    int nranks = 0, r = -1;
    EXPECT_EQ(g.last_init(&id, &nranks, &r), 1);  // one live communicator
    EXPECT_EQ(nranks, size);
    EXPECT_EQ(r, rank);
    // Only rank 0 called ncclGetUniqueId (the fake's pattern); the others hold it from MPI_Bcast.
    for (int i = 0; i < 128; ++i) ASSERT_EQ(id.internal[i], static_cast<char>(i * 7 + 3)) << "byte " << i;
    EXPECT_EQ(pg->rank(), rank);
    EXPECT_EQ(pg->size(), size);
    EXPECT_EQ(pg->name(), "world");

    // CPU tensors take the group's MPI communicator: each rank feeds its rank number.
    torch::Tensor t = torch::full({3}, static_cast<double>(rank), torch::kFloat64);
    pg->allreduce(t, ReduceOp::Sum)->wait();
    EXPECT_EQ(t[0].item<double>(), size * (size - 1) / 2.0);
    torch::Tensor b = torch::full({2}, static_cast<int64_t>(rank + 5), torch::kInt64);
    pg->broadcast(b, 0)->wait();
    EXPECT_EQ(b[1].item<int64_t>(), 5);
    torch::Tensor out = torch::empty({size}, torch::kFloat32), in = torch::full({1}, static_cast<float>(rank));
    pg->allgather(out, in)->wait();
    EXPECT_TRUE(out.equal(torch::arange(size, torch::kFloat32)));
    pg->barrier();
    EXPECT_THROW(pg->broadcast(b, size), std::invalid_argument);  // no such root
  }
  ncclUniqueId id{};
  int nranks = 0, r = 0;
  EXPECT_EQ(g.last_init(&id, &nranks, &r), 0);  // ncclCommDestroy on destruction
}

TEST(NcclBootstrap, UniqueIdFailureEndsEveryRank) {
  FakeGpu g;
  FailOn fail("unique_id");
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  try {
    make_group(g);
    FAIL() << "no error";
  } catch (const std::runtime_error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("world group (NCCL 21903, " FAKE_NCCL "): ncclGetUniqueId failed on the group's rank 0"),
              std::string::npos)
        << m;
    if (rank == 0) {  // ncclGetErrorString's text
      EXPECT_NE(m.find("fake NCCL error"), std::string::npos) << m;
    }
  }
}

TEST(NcclBootstrap, InitFailureNamesTheCall) {
  FakeGpu g;
  FailOn fail("init");
  try {
    make_group(g);
    FAIL() << "no error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("ncclCommInitRank(") , std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("NCCL error 5 (invalid usage (fake))"), std::string::npos) << e.what();
  }
}

TEST(NcclBootstrap, BadDeviceIsTheCudaRuntimesError) {
  FakeGpu g;
  try {
    NcclProcessGroup pg(dup_world(), "tp", 3, *g.nccl, *g.cuda, [] { return nullptr; });
    FAIL() << "no error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("cudaSetDevice(3): CUDA error 101 (invalid device ordinal (fake))"),
              std::string::npos)
        << e.what();
  }
}

// --- placement -------------------------------------------------------------------------------

TEST(Placement, CpuAndMpiOnEveryRank) {
  const Topology topo = discover_topology();
  const Placement p = place_rank("cpu", "auto", topo);
  EXPECT_FALSE(p.device.cuda());
  EXPECT_EQ(p.backend, Backend::Mpi);
  EXPECT_EQ(p.local.rank, topo.local_rank);
}

TEST(Placement, OneRanksErrorReachesEveryRank) {
  const Topology topo = discover_topology();
  int size = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  const int bad = size - 1;  // the last rank's launcher variable is garbage
  const char* saved = std::getenv("OMPI_COMM_WORLD_LOCAL_RANK");
  const std::string keep = saved ? saved : "";
  if (topo.rank == bad) setenv("OMPI_COMM_WORLD_LOCAL_RANK", "seven", 1);
  std::string message;
  try {
    place_rank("cpu", "mpi", topo);
  } catch (const std::invalid_argument& e) {
    message = e.what();
  }
  if (saved) setenv("OMPI_COMM_WORLD_LOCAL_RANK", keep.c_str(), 1);
  else unsetenv("OMPI_COMM_WORLD_LOCAL_RANK");
  if (topo.rank == bad) {
    EXPECT_EQ(message, "OMPI_COMM_WORLD_LOCAL_RANK=seven is not a local rank (a non-negative integer)");
  } else {
    EXPECT_EQ(message, "rank " + std::to_string(bad) +
                           " rejected parallel.device=cpu / parallel.backend=mpi (its message says why)");
  }
}

TEST(Placement, CudaOnThisBuild) {
  if (torch_device::built_with_cuda()) GTEST_SKIP() << "LibTorch with CUDA: tests/gpu covers parallel.device=cuda";
  const Topology topo = discover_topology();
  try {
    place_rank("cuda", "auto", topo);
    FAIL() << "no error on a CPU LibTorch";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("parallel.device=cuda: this shardtune is built against a LibTorch without CUDA"),
              std::string::npos)
        << e.what();
  }
}
