// The GPU path on a GPU (scripts/gpu_check.sh runs it; CTest only in a CUDA build): the NCCL
// process group's every verb and dtype on CUDA tensors under mpiexec -n 1 (and -n 2 on one
// GPU where NCCL allows it), each rank fed its rank number; a tiny ViT's forward
// on cuda against the CPU's; the allocator's figures. On a CPU build every test
// skips (the binary still compiles in CI).
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cstdio>

#include "common/device.h"
#include "common/torch_device.h"
#include "distributed/mesh.h"
#include "distributed/nccl_process_group.h"
#include "models/vit.h"
#include "tests/tiny.h"

using namespace shardtune;

namespace {

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

// Ranks share GPUs round robin (two ranks on one GPU: NCCL may refuse, gpu_check.sh says so).
int my_gpu() { return world_rank() % std::max(1, torch_device::gpu_count()); }

#define REQUIRE_GPU()                                                                 \
  if (!torch_device::built_with_cuda() || torch_device::gpu_count() == 0)             \
  GTEST_SKIP() << "needs LibTorch with CUDA and a GPU"

std::shared_ptr<NcclProcessGroup> world_group() {
  std::string error;
  const NcclApi* nccl = nccl_api(&error);
  EXPECT_NE(nccl, nullptr) << error;
  const CudaApi* cuda = cuda_api(&error);
  EXPECT_NE(cuda, nullptr) << error;
  if (!nccl || !cuda) return nullptr;
  torch_device::set_device(my_gpu());
  MPI_Comm c;
  MPI_Comm_dup(MPI_COMM_WORLD, &c);
  const int gpu = my_gpu();
  return std::make_shared<NcclProcessGroup>(c, "world", gpu, *nccl, *cuda, [gpu] { return torch_device::current_stream(gpu); });
}

torch::TensorOptions on_gpu(torch::ScalarType t) { return torch::TensorOptions().dtype(t).device(torch::kCUDA, my_gpu()); }

}  // namespace

TEST(GpuNccl, EveryVerbEveryDtype) {
  REQUIRE_GPU();
  auto g = world_group();
  ASSERT_NE(g, nullptr);
  const int r = g->rank(), n = g->size();
  for (auto dt : {torch::kFloat32, torch::kFloat64, torch::kBFloat16, torch::kFloat16, torch::kInt64}) {
    SCOPED_TRACE(c10::toString(dt));
    // Written by a kernel on the compute stream just before: the event orders the transfer after it.
    auto filled = [&](int64_t len, double v) { return torch::zeros({len}, on_gpu(dt)).add_(v); };
    torch::Tensor s = filled(1000, r);
    g->allreduce(s, ReduceOp::Sum)->wait();
    EXPECT_TRUE(s.cpu().to(torch::kFloat64).eq(n * (n - 1) / 2.0).all().item<bool>());
    torch::Tensor m = filled(7, r);
    g->allreduce(m, ReduceOp::Max)->wait();
    EXPECT_TRUE(m.cpu().to(torch::kFloat64).eq(n - 1).all().item<bool>());
    torch::Tensor a = filled(5, 2 * r + 1);  // mean 2(n-1)/2 + 1 = n: exact in every dtype
    g->allreduce(a, ReduceOp::Avg)->wait();
    EXPECT_TRUE(a.cpu().to(torch::kFloat64).eq(n).all().item<bool>());
    torch::Tensor b = filled(9, r + 3);
    g->broadcast(b, n - 1)->wait();
    EXPECT_TRUE(b.cpu().to(torch::kFloat64).eq(n + 2).all().item<bool>());
    torch::Tensor in = filled(4, r), out = torch::empty({4 * n}, on_gpu(dt));
    g->allgather(out, in)->wait();
    EXPECT_TRUE(out.cpu().to(torch::kFloat64).view({n, 4}).select(1, 0).equal(torch::arange(n, torch::kFloat64)));
    torch::Tensor rs_in = filled(3 * n, r), rs_out = torch::empty({3}, on_gpu(dt));
    g->reduce_scatter(rs_out, rs_in, ReduceOp::Sum)->wait();
    EXPECT_TRUE(rs_out.cpu().to(torch::kFloat64).eq(n * (n - 1) / 2.0).all().item<bool>());
  }
  if (n % 2 == 0) {  // pairs (0,1), (2,3): the even rank sends first, the odd one receives first
    const int peer = r ^ 1;
    torch::Tensor mine = torch::full({6}, static_cast<float>(r), on_gpu(torch::kFloat32));
    torch::Tensor theirs = torch::empty({6}, on_gpu(torch::kFloat32));
    if (r % 2 == 0) {
      g->send(mine, peer, 0)->wait();
      g->recv(theirs, peer, 0)->wait();
    } else {
      g->recv(theirs, peer, 0)->wait();
      g->send(mine, peer, 0)->wait();
    }
    EXPECT_TRUE(theirs.cpu().eq(static_cast<float>(peer)).all().item<bool>());
  }
  // CPU tensors still take MPI through the same group; a tensor on both devices is refused.
  torch::Tensor c = torch::full({2}, static_cast<double>(r), torch::kFloat64);
  g->allreduce(c, ReduceOp::Sum)->wait();
  EXPECT_EQ(c[0].item<double>(), n * (n - 1) / 2.0);
  torch::Tensor cpu_out = torch::empty({n}, torch::kFloat32);
  EXPECT_THROW(g->allgather(cpu_out, torch::zeros({1}, on_gpu(torch::kFloat32))), std::invalid_argument);
  g->barrier();
}

TEST(GpuNccl, MeshOnNccl) {
  REQUIRE_GPU();
  const int n = [] { int s = 1; MPI_Comm_size(MPI_COMM_WORLD, &s); return s; }();
  Mesh m = make_mesh(ParallelDims::make(n, 1, 1), Backend::Nccl, DeviceChoice{DeviceKind::Cuda, my_gpu()});
  torch::Tensor t = torch::ones({3}, on_gpu(torch::kFloat32));
  m.dp->allreduce(t, ReduceOp::Avg)->wait();
  EXPECT_TRUE(t.cpu().eq(1.0f).all().item<bool>());
}

TEST(GpuModel, ForwardMatchesTheCpu) {
  REQUIRE_GPU();
  torch::manual_seed(3);
  VisionTransformer cpu(tiny_config());
  VisionTransformer gpu(tiny_config());
  torch::NoGradGuard ng;
  auto src = cpu->named_parameters();
  for (auto& p : gpu->named_parameters()) p.value().copy_(src[p.key()]);
  gpu->to(torch::Device(torch::kCUDA, my_gpu()));
  torch::Tensor x = torch::randn({4, tiny_config().in_chans, tiny_config().image_size, tiny_config().image_size});
  torch::Tensor yc = cpu->forward(x), yg = gpu->forward(x.to(torch::Device(torch::kCUDA, my_gpu())));
  EXPECT_TRUE(torch::allclose(yc, yg.cpu(), 1e-4, 1e-4)) << (yc - yg.cpu()).abs().max();
}

TEST(GpuFigures, NameAndPeakMemory) {
  REQUIRE_GPU();
  const int gpu = my_gpu();
  torch_device::reset_peak(gpu);
  torch::Tensor big = torch::empty({64 << 20}, on_gpu(torch::kFloat32));  // 256 MiB
  EXPECT_GE(torch_device::peak_allocated_bytes(gpu), int64_t{256} << 20);
  const std::string name = torch_device::name(gpu);
  EXPECT_FALSE(name.empty());
  std::printf("[gpu] %s: bf16 peak %s\n", name.c_str(),
              bf16_peak_flops(name) ? std::to_string(*bf16_peak_flops(name) / 1e12).c_str() : "not in the table");
}

int main(int argc, char** argv) {
  MpiRuntime mpi(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  if (mpi.rank() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  int rc = RUN_ALL_TESTS(), worst = rc;
  MPI_Allreduce(&rc, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  return worst;
}
