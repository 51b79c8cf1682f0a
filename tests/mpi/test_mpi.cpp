// Multi-rank tests, run by CTest under `mpiexec -n 2` and `-n 4`: every verb on every
// dtype with each rank feeding its rank number, sub-groups of the mesh, bucketed gradient
// sync. Expectations are closed forms in the rank and the world size.
#include <gtest/gtest.h>
#include <mpi.h>
#include <torch/torch.h>

#include "distributed/grad_sync.h"
#include "distributed/mesh.h"
#include "distributed/mpi_process_group.h"

using namespace shardtune;

namespace {

std::shared_ptr<ProcessGroup> world() {
  static auto w = make_mesh(ParallelDims::make([] {
                              int n = 0;
                              MPI_Comm_size(MPI_COMM_WORLD, &n);
                              return n;
                            }(), 1, 1))
                      .world;
  return w;
}

const std::vector<torch::ScalarType> kDTypes = {torch::kFloat32, torch::kFloat64, torch::kBFloat16, torch::kFloat16,
                                                torch::kInt64};

}  // namespace

TEST(Collectives, AllreduceSumAvgMax) {
  auto g = world();
  const int r = g->rank(), n = g->size();
  for (auto dt : kDTypes) {
    // Element i of rank r holds r + i: sum = n(n-1)/2 + n i, max = n-1 + i.
    torch::Tensor base = torch::arange(5, torch::kFloat64) + r;
    torch::Tensor sum = base.to(dt).clone(), avg = base.to(dt).clone(), mx = base.to(dt).clone();  // .to() of the same dtype aliases
    g->allreduce(sum, ReduceOp::Sum)->wait();
    g->allreduce(avg, ReduceOp::Avg)->wait();
    g->allreduce(mx, ReduceOp::Max)->wait();
    torch::Tensor i = torch::arange(5, torch::kFloat64);
    EXPECT_TRUE(torch::equal(sum.to(torch::kFloat64), i * n + n * (n - 1) / 2.0)) << c10::toString(dt);
    torch::Tensor want_avg = i + (n - 1) / 2.0;
    if (dt == torch::kInt64) want_avg = want_avg.floor();
    EXPECT_TRUE(torch::allclose(avg.to(torch::kFloat64), want_avg, 1e-2, 0)) << c10::toString(dt);
    EXPECT_TRUE(torch::equal(mx.to(torch::kFloat64), i + (n - 1))) << c10::toString(dt);
  }
}

TEST(Collectives, HalfPrecisionSumsAreNotBytewise) {
  auto g = world();
  // 1.5 in bf16 is 0x3FC0; a byte-wise integer sum of n copies would not be n * 1.5.
  for (auto dt : {torch::kBFloat16, torch::kFloat16}) {
    torch::Tensor t = torch::full({3}, 1.5, dt);
    g->allreduce(t)->wait();
    EXPECT_TRUE(torch::equal(t.to(torch::kFloat32), torch::full({3}, 1.5f * g->size()))) << c10::toString(dt);
  }
}

TEST(Collectives, BroadcastAllgatherReduceScatter) {
  auto g = world();
  const int r = g->rank(), n = g->size();
  for (auto dt : kDTypes) {
    const int root = n - 1;
    torch::Tensor b = torch::full({4}, static_cast<double>(r), torch::kFloat64).to(dt);
    g->broadcast(b, root)->wait();
    EXPECT_TRUE(torch::equal(b.to(torch::kFloat64), torch::full({4}, static_cast<double>(root), torch::kFloat64)));

    torch::Tensor in = torch::full({2}, static_cast<double>(r), torch::kFloat64).to(dt);
    torch::Tensor out = torch::empty({n * 2}, dt);
    g->allgather(out, in)->wait();
    EXPECT_TRUE(torch::equal(out.to(torch::kFloat64),
                             torch::arange(n, torch::kFloat64).repeat_interleave(2)))
        << c10::toString(dt);

    // Rank r contributes r + block index k to block k: rank k gets n k + n(n-1)/2.
    torch::Tensor rs_in = (torch::arange(n, torch::kFloat64).repeat_interleave(3) + r).to(dt);
    torch::Tensor rs_out = torch::empty({3}, dt);
    g->reduce_scatter(rs_out, rs_in)->wait();
    EXPECT_TRUE(torch::equal(rs_out.to(torch::kFloat64), torch::full({3}, n * r + n * (n - 1) / 2.0, torch::kFloat64)))
        << c10::toString(dt);
  }
}

TEST(Collectives, SendRecvRing) {
  auto g = world();
  const int r = g->rank(), n = g->size();
  if (n < 2) GTEST_SKIP();
  for (auto dt : kDTypes) {
    torch::Tensor out = torch::full({6}, static_cast<double>(r), torch::kFloat64).to(dt);
    torch::Tensor in = torch::empty({6}, dt);
    auto s = g->send(out, (r + 1) % n, 7);
    auto q = g->recv(in, (r + n - 1) % n, 7);
    s->wait();
    q->wait();
    EXPECT_TRUE(torch::equal(in.to(torch::kFloat64), torch::full({6}, static_cast<double>((r + n - 1) % n), torch::kFloat64)));
  }
  g->barrier();
}

TEST(Collectives, BadTensorsAreRejectedBeforeAnyCommunication) {
  auto g = world();
  torch::Tensor strided = torch::zeros({4, 4}).t();
  EXPECT_THROW(g->allreduce(strided), std::invalid_argument);
  torch::Tensor ints = torch::zeros({4}, torch::kInt32);
  try {
    g->allreduce(ints);
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("world group allreduce: dtype Int is not supported"), std::string::npos)
        << e.what();
  }
}

// The 2x2 mesh of 4 ranks: tp pairs {0,1}, {2,3}; dp pairs {0,2}, {1,3} (pp = 1); and with
// pp = 2: pp pairs {0,2}, {1,3}, dp of one.
TEST(Mesh, SubGroupsFollowTheLayout) {
  if (world()->size() != 4) GTEST_SKIP() << "needs 4 ranks";
  for (int pp : {1, 2}) {
    Mesh m = make_mesh(ParallelDims::make(4, 2, pp));
    const int r = m.rank;
    torch::Tensor t = torch::full({1}, static_cast<double>(r), torch::kFloat64);
    torch::Tensor tp_sum = t.clone(), dp_sum = t.clone(), pp_sum = t.clone();
    m.tp->allreduce(tp_sum)->wait();
    m.dp->allreduce(dp_sum)->wait();
    m.pp->allreduce(pp_sum)->wait();
    EXPECT_EQ(m.tp->size(), 2);
    EXPECT_EQ(tp_sum.item<double>(), r < 2 ? 1 : 5);            // {0,1} or {2,3}
    EXPECT_EQ(m.tp->rank(), r % 2);
    if (pp == 1) {
      EXPECT_EQ(m.dp->size(), 2);
      EXPECT_EQ(dp_sum.item<double>(), r % 2 == 0 ? 2 : 4);    // {0,2} or {1,3}
      EXPECT_EQ(pp_sum.item<double>(), r);
    } else {
      EXPECT_EQ(m.dp->size(), 1);
      EXPECT_EQ(pp_sum.item<double>(), r % 2 == 0 ? 2 : 4);
      EXPECT_EQ(m.pp_rank(), r / 2);
    }
  }
}

// --- gradient sync ---------------------------------------------------------------------------------

namespace {

struct SyncCase {
  std::vector<torch::Tensor> params;
  torch::Tensor frozen;
};

// Three trainable parameters and a frozen one; rank r's loss is (r + 1) * sum(p * c_p).
SyncCase make_case() {
  torch::manual_seed(0);
  SyncCase c;
  c.params = {torch::randn({100, 30}).requires_grad_(), torch::randn({257}).requires_grad_(),
              torch::randn({64, 64}).requires_grad_()};
  c.frozen = torch::randn({10});
  return c;
}

void backward(SyncCase& c, int rank) {
  torch::Tensor loss = c.frozen.sum() * 0;
  for (size_t k = 0; k < c.params.size(); ++k) loss = loss + (c.params[k] * (static_cast<double>(k) + 1)).sum() * (rank + 1);
  loss.backward();
}

}  // namespace

TEST(GradSync, AveragesOverDpInBucketsWithoutFrozenParameters) {
  auto g = world();
  const int n = g->size();
  for (bool hooks : {false, true}) {
    for (double bucket_mb : {0.01, 25.0}) {  // 0.01 MB: one bucket per parameter
      SyncCase c = make_case();
      GradSync sync(c.params, g, bucket_mb);
      if (hooks) sync.prepare_for_backward();
      backward(c, g->rank());
      sync.finish();
      // mean over ranks of (r + 1) * (k + 1) = (n + 1) / 2 * (k + 1)
      for (size_t k = 0; k < c.params.size(); ++k)
        EXPECT_TRUE(torch::allclose(c.params[k].grad(), torch::full_like(c.params[k], (n + 1) / 2.0 * (k + 1))))
            << "param " << k << " hooks " << hooks << " bucket_mb " << bucket_mb;
      EXPECT_FALSE(c.frozen.grad().defined());
      EXPECT_EQ(sync.bytes_per_step(), n > 1 ? (3000 + 257 + 4096) * 4 : 0);
      size_t members = 0;
      for (const auto& b : sync.bucket_members()) members += b.size();
      EXPECT_EQ(members, 3u);
      EXPECT_EQ(sync.bucket_members().size(), bucket_mb < 1 ? 3u : 1u);
    }
  }
}

TEST(GradSync, AccumulatedMicroBatchesSyncOnce) {
  auto g = world();
  const int n = g->size();
  SyncCase c = make_case();
  GradSync sync(c.params, g, 0.01);
  backward(c, g->rank());          // micro-batch 1: no sync
  sync.prepare_for_backward();     // the last micro-batch's backward launches the buckets
  backward(c, g->rank());
  sync.finish();
  for (size_t k = 0; k < c.params.size(); ++k)
    EXPECT_TRUE(torch::allclose(c.params[k].grad(), torch::full_like(c.params[k], (n + 1) * (k + 1.0))));
}

TEST(GradSync, RejectsFrozenParameters) {
  EXPECT_THROW(GradSync({torch::zeros({3})}, world()), std::invalid_argument);
}

int main(int argc, char** argv) {
  MpiRuntime mpi(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  if (mpi.rank() != 0) {  // one report; other ranks still fail the job through their exit code
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  int rc = RUN_ALL_TESTS();
  // A failure on one rank alone must fail the job on every rank.
  int worst = rc;
  MPI_Allreduce(&rc, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  return worst;
}
