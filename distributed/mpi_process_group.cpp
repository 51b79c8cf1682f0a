#include "distributed/mpi_process_group.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <functional>
#include <stdexcept>
#include <vector>

namespace shardtune {

namespace {

// --- half-precision reductions, accumulated in fp32 ---------------------------------------

template <typename T, bool kMax>
void half_op(void* in, void* inout, int* len, MPI_Datatype*) {
  const T* a = static_cast<const T*>(in);
  T* b = static_cast<T*>(inout);
  for (int i = 0; i < *len; ++i) {
    float x = static_cast<float>(a[i]), y = static_cast<float>(b[i]);
    b[i] = static_cast<T>(kMax ? std::max(x, y) : x + y);
  }
}

struct HalfOps {
  MPI_Op bf16_sum, bf16_max, f16_sum, f16_max;
  HalfOps() {
    MPI_Op_create(&half_op<c10::BFloat16, false>, 1, &bf16_sum);
    MPI_Op_create(&half_op<c10::BFloat16, true>, 1, &bf16_max);
    MPI_Op_create(&half_op<c10::Half, false>, 1, &f16_sum);
    MPI_Op_create(&half_op<c10::Half, true>, 1, &f16_max);
  }
};

const HalfOps& half_ops() {
  static HalfOps ops;  // created on first use, after MPI_Init; freed by MPI_Finalize
  return ops;
}

MPI_Datatype mpi_type(torch::ScalarType t) {
  switch (t) {
    case torch::kFloat32: return MPI_FLOAT;
    case torch::kFloat64: return MPI_DOUBLE;
    case torch::kInt64: return MPI_INT64_T;
    case torch::kUInt8: return MPI_UINT8_T;  // bytes (names) between ranks
    case torch::kBFloat16:
    case torch::kFloat16: return MPI_UINT16_T;  // reduced by the ops above, never as integers
    default: return MPI_DATATYPE_NULL;
  }
}

MPI_Op mpi_op(torch::ScalarType t, ReduceOp op) {
  const bool max = op == ReduceOp::Max;
  if (t == torch::kBFloat16) return max ? half_ops().bf16_max : half_ops().bf16_sum;
  if (t == torch::kFloat16) return max ? half_ops().f16_max : half_ops().f16_sum;
  return max ? MPI_MAX : MPI_SUM;
}

void check_mpi(int rc, const std::string& what) {
  if (rc == MPI_SUCCESS) return;
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  throw std::runtime_error(what + ": " + std::string(msg, static_cast<size_t>(len)));
}

struct MpiWork : Work {
  std::vector<MPI_Request> requests;
  std::vector<torch::Tensor> keep_alive;
  std::function<void()> on_done;  // e.g. the division of an average
  std::string what;
  bool done = false;

  void wait() override {
    if (done) return;
    done = true;
    check_mpi(MPI_Waitall(static_cast<int>(requests.size()), requests.data(), MPI_STATUSES_IGNORE), what);
    if (on_done) on_done();
  }
  ~MpiWork() override {
    if (!done && !requests.empty()) MPI_Waitall(static_cast<int>(requests.size()), requests.data(), MPI_STATUSES_IGNORE);
  }
};

}  // namespace

MpiProcessGroup::MpiProcessGroup(MPI_Comm comm, std::string name) : comm_(comm), name_(std::move(name)) {
  MPI_Comm_rank(comm_, &rank_);
  MPI_Comm_size(comm_, &size_);
  MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
}

MpiProcessGroup::~MpiProcessGroup() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized && comm_ != MPI_COMM_WORLD && comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
}

namespace {

// Validates a tensor for MPI and returns its datatype; the message names group, verb, dtype.
MPI_Datatype checked(const ProcessGroup& g, const torch::Tensor& t, const char* verb) {
  auto fail = [&](const std::string& why) {
    throw std::invalid_argument(g.name() + " group " + verb + ": " + why);
  };
  if (!t.defined()) fail("undefined tensor");
  if (!t.device().is_cpu()) fail("MPI needs CPU tensors, got one on " + t.device().str());
  if (!t.is_contiguous()) fail("tensor is not contiguous");
  MPI_Datatype dt = mpi_type(t.scalar_type());
  if (dt == MPI_DATATYPE_NULL) fail(std::string("dtype ") + c10::toString(t.scalar_type()) + " is not supported");
  return dt;
}

int count_of(const torch::Tensor& t) {
  if (t.numel() > INT32_MAX) throw std::invalid_argument("tensor of " + std::to_string(t.numel()) + " elements exceeds MPI's int count");
  return static_cast<int>(t.numel());
}

std::function<void()> divide_after(torch::Tensor t, ReduceOp op, int size) {
  if (op != ReduceOp::Avg) return nullptr;
  return [t, size]() mutable {
    if (t.is_floating_point()) t.div_(size);
    else t.div_(size, "trunc");
  };
}

}  // namespace

std::shared_ptr<Work> MpiProcessGroup::allreduce(torch::Tensor& t, ReduceOp op) {
  MPI_Datatype dt = checked(*this, t, "allreduce");
  auto w = std::make_shared<MpiWork>();
  w->what = name_ + " allreduce";
  w->keep_alive = {t};
  w->requests.resize(1);
  check_mpi(MPI_Iallreduce(MPI_IN_PLACE, t.data_ptr(), count_of(t), dt, mpi_op(t.scalar_type(), op), comm_,
                           &w->requests[0]),
            w->what);
  w->on_done = divide_after(t, op, size_);
  return w;
}

std::shared_ptr<Work> MpiProcessGroup::broadcast(torch::Tensor& t, int root) {
  MPI_Datatype dt = checked(*this, t, "broadcast");
  if (root < 0 || root >= size_)
    throw std::invalid_argument(name_ + " group broadcast: root " + std::to_string(root) + " is not a rank of " +
                                std::to_string(size_));
  auto w = std::make_shared<MpiWork>();
  w->what = name_ + " broadcast";
  w->keep_alive = {t};
  w->requests.resize(1);
  check_mpi(MPI_Ibcast(t.data_ptr(), count_of(t), dt, root, comm_, &w->requests[0]), w->what);
  return w;
}

std::shared_ptr<Work> MpiProcessGroup::allgather(torch::Tensor& out, const torch::Tensor& in) {
  MPI_Datatype dt = checked(*this, in, "allgather");
  checked(*this, out, "allgather");
  if (out.numel() != in.numel() * size_ || out.scalar_type() != in.scalar_type())
    throw std::invalid_argument(name_ + " group allgather: output holds " + std::to_string(out.numel()) +
                                " elements, needs " + std::to_string(in.numel() * size_) + " of the input's dtype");
  auto w = std::make_shared<MpiWork>();
  w->what = name_ + " allgather";
  w->keep_alive = {out, in};
  w->requests.resize(1);
  check_mpi(MPI_Iallgather(in.data_ptr(), count_of(in), dt, out.data_ptr(), count_of(in), dt, comm_, &w->requests[0]),
            w->what);
  return w;
}

std::shared_ptr<Work> MpiProcessGroup::reduce_scatter(torch::Tensor& out, const torch::Tensor& in, ReduceOp op) {
  MPI_Datatype dt = checked(*this, in, "reduce_scatter");
  checked(*this, out, "reduce_scatter");
  if (in.numel() != out.numel() * size_ || out.scalar_type() != in.scalar_type())
    throw std::invalid_argument(name_ + " group reduce_scatter: input holds " + std::to_string(in.numel()) +
                                " elements, needs " + std::to_string(out.numel() * size_) + " of the output's dtype");
  auto w = std::make_shared<MpiWork>();
  w->what = name_ + " reduce_scatter";
  w->keep_alive = {out, in};
  w->requests.resize(1);
  check_mpi(MPI_Ireduce_scatter_block(in.data_ptr(), out.data_ptr(), count_of(out), dt, mpi_op(in.scalar_type(), op),
                                      comm_, &w->requests[0]),
            w->what);
  w->on_done = divide_after(out, op, size_);
  return w;
}

std::shared_ptr<Work> MpiProcessGroup::send(const torch::Tensor& t, int dst, int tag) {
  MPI_Datatype dt = checked(*this, t, "send");
  auto w = std::make_shared<MpiWork>();
  w->what = name_ + " send to " + std::to_string(dst);
  w->keep_alive = {t};
  w->requests.resize(1);
  check_mpi(MPI_Isend(t.data_ptr(), count_of(t), dt, dst, tag, comm_, &w->requests[0]), w->what);
  return w;
}

std::shared_ptr<Work> MpiProcessGroup::recv(torch::Tensor& t, int src, int tag) {
  MPI_Datatype dt = checked(*this, t, "recv");
  auto w = std::make_shared<MpiWork>();
  w->what = name_ + " recv from " + std::to_string(src);
  w->keep_alive = {t};
  w->requests.resize(1);
  check_mpi(MPI_Irecv(t.data_ptr(), count_of(t), dt, src, tag, comm_, &w->requests[0]), w->what);
  return w;
}

void MpiProcessGroup::barrier() { check_mpi(MPI_Barrier(comm_), name_ + " barrier"); }

}  // namespace shardtune
