#include "distributed/nccl_process_group.h"

#include <cstring>
#include <stdexcept>

namespace shardtune {

constexpr int kNccl2_10 = 21000;  // bf16 and ncclAvg

ncclDataType nccl_dtype(torch::ScalarType t, int version) {
  switch (t) {
    case torch::kFloat32: return ncclFloat32;
    case torch::kFloat64: return ncclFloat64;
    case torch::kFloat16: return ncclFloat16;
    case torch::kInt64: return ncclInt64;
    case torch::kUInt8: return ncclUint8;
    case torch::kBFloat16:
      if (version < kNccl2_10)
        throw std::invalid_argument("dtype BFloat16 needs NCCL 2.10 or newer, this one is " + std::to_string(version));
      return ncclBfloat16;
    default: throw std::invalid_argument(std::string("dtype ") + c10::toString(t) + " is not supported by the NCCL group");
  }
}

ncclRedOp nccl_op(ReduceOp op, torch::ScalarType t, int version, bool* divide_after) {
  *divide_after = false;
  if (op == ReduceOp::Max) return ncclMax;
  if (op == ReduceOp::Sum) return ncclSum;
  if (c10::isFloatingType(t) && version >= kNccl2_10) return ncclAvg;
  *divide_after = true;
  return ncclSum;
}

// --- the bootstrap -------------------------------------------------------------------------

NcclProcessGroup::NcclProcessGroup(MPI_Comm comm, std::string name, int device, const NcclApi& nccl,
                                   const CudaApi& cuda, std::function<void*()> compute_stream)
    : cpu_(std::make_unique<MpiProcessGroup>(comm, name)), nccl_(nccl), cuda_(cuda),
      compute_stream_(std::move(compute_stream)), device_(device) {
  const std::string what = cpu_->name() + " group (NCCL " + std::to_string(nccl_.version) + ", " + nccl_.path + ")";
  cuda_.check(cuda_.SetDevice(device_), what + ": cudaSetDevice(" + std::to_string(device_) + ")");
  // Rank 0 sends [ok, id]: when it cannot make an id every rank learns so, none waits.
  struct {
    char ok;
    ncclUniqueId id;
  } msg{};
  std::string rank0_error;
  if (rank() == 0) {
    const ncclResult_t r = nccl_.GetUniqueId(&msg.id);
    msg.ok = r == 0;
    if (r != 0) rank0_error = nccl_.GetErrorString(r);
  }
  if (MPI_Bcast(&msg, sizeof(msg), MPI_BYTE, 0, cpu_->comm()) != MPI_SUCCESS)
    throw std::runtime_error(what + ": MPI_Bcast of the NCCL unique id failed");
  if (!msg.ok)
    throw std::runtime_error(what + ": ncclGetUniqueId failed on the group's rank 0" +
                             (rank0_error.empty() ? "" : ": " + rank0_error));
  nccl_.check(nccl_.CommInitRank(&comm_, size(), msg.id, rank()),
              what + ": ncclCommInitRank(" + std::to_string(size()) + " ranks, rank " + std::to_string(rank()) + ")");
  cuda_.check(cuda_.StreamCreateWithFlags(&stream_, kCudaStreamNonBlocking), what + ": cudaStreamCreateWithFlags");
}

NcclProcessGroup::~NcclProcessGroup() {
  if (stream_) {
    cuda_.StreamSynchronize(stream_);
    cuda_.StreamDestroy(stream_);
  }
  if (comm_) nccl_.CommDestroy(comm_);
}

void NcclProcessGroup::abort() {
  if (comm_) nccl_.CommAbort(comm_);
  comm_ = nullptr;
}

void NcclProcessGroup::check(ncclResult_t r, const std::string& what) {
  if (r == 0) return;
  const std::string text = nccl_.GetErrorString(r);
  abort();
  throw std::runtime_error(what + ": NCCL error " + std::to_string(r) + " (" + text + "); communicator aborted");
}

// --- work ----------------------------------------------------------------------------------

struct NcclWork : Work {
  NcclProcessGroup* group = nullptr;
  std::string what;
  std::vector<torch::Tensor> keep_alive;  // until the compute stream has waited for `done`
  std::function<void()> after;
  cudaEvent_t done = nullptr;
  bool waited = false;

  void wait() override {
    if (waited) return;
    waited = true;
    const CudaApi& cuda = group->cuda_;
    cuda.check(cuda.StreamWaitEvent(group->compute_stream_(), done, 0), what + ": cudaStreamWaitEvent");
    if (group->comm_) {
      ncclResult_t async = 0;
      group->check(group->nccl_.CommGetAsyncError(group->comm_, &async), what + ": ncclCommGetAsyncError");
      group->check(async, what);
    }
    if (after) after();
  }
  ~NcclWork() override {
    // Never waited for: the tensors must outlive the transfer before they go back to the
    // caching allocator.
    if (!waited && done) group->cuda_.EventSynchronize(done);
    if (done) group->cuda_.EventDestroy(done);
  }
};

std::shared_ptr<Work> NcclProcessGroup::enqueue(const std::string& what, std::vector<torch::Tensor> keep,
                                                const std::function<ncclResult_t(cudaStream_t)>& issue,
                                                std::function<void()> after) {
  if (!comm_) throw std::runtime_error(what + ": the communicator was aborted after an earlier failure");
  cudaEvent_t ready = nullptr;
  auto w = std::make_shared<NcclWork>();
  w->group = this;
  w->what = what;
  w->keep_alive = std::move(keep);
  w->after = std::move(after);
  cuda_.check(cuda_.EventCreateWithFlags(&ready, kCudaEventDisableTiming), what + ": cudaEventCreateWithFlags");
  cuda_.check(cuda_.EventCreateWithFlags(&w->done, kCudaEventDisableTiming), what + ": cudaEventCreateWithFlags");
  // The inputs are written by work queued on the compute stream: the transfer starts after it.
  cuda_.check(cuda_.EventRecord(ready, compute_stream_()), what + ": cudaEventRecord");
  cuda_.check(cuda_.StreamWaitEvent(stream_, ready, 0), what + ": cudaStreamWaitEvent");
  cuda_.EventDestroy(ready);  // released once recorded work completes
  check(issue(stream_), what);
  cuda_.check(cuda_.EventRecord(w->done, stream_), what + ": cudaEventRecord");
  return w;
}

namespace {

// Where a verb's tensors live: all on this group's GPU (NCCL) or all on the CPU (MPI).
bool on_gpu(const ProcessGroup& g, int device, const char* verb, std::initializer_list<const torch::Tensor*> ts) {
  int gpu = 0, cpu = 0;
  for (const torch::Tensor* t : ts) {
    if (!t->defined()) throw std::invalid_argument(g.name() + " group " + verb + ": undefined tensor");
    if (t->device().is_cpu()) {
      ++cpu;
      continue;
    }
    if (!t->device().is_cuda() || t->device().index() != device)
      throw std::invalid_argument(g.name() + " group " + verb + ": a tensor on " + t->device().str() +
                                  ", the group's device is cuda:" + std::to_string(device));
    if (!t->is_contiguous()) throw std::invalid_argument(g.name() + " group " + verb + ": tensor is not contiguous");
    ++gpu;
  }
  if (gpu && cpu) throw std::invalid_argument(g.name() + " group " + verb + ": tensors on both the CPU and the GPU");
  return gpu > 0;
}

size_t count(const torch::Tensor& t) { return static_cast<size_t>(t.numel()); }

std::function<void()> divide(torch::Tensor t, int size) {
  return [t, size]() mutable {
    if (t.is_floating_point()) t.div_(size);
    else t.div_(size, "trunc");
  };
}

}  // namespace

// --- the verbs -----------------------------------------------------------------------------

std::shared_ptr<Work> NcclProcessGroup::allreduce(torch::Tensor& t, ReduceOp op) {
  if (!on_gpu(*this, device_, "allreduce", {&t})) return cpu_->allreduce(t, op);
  const std::string what = name() + " group allreduce";
  bool div = false;
  const ncclDataType dt = nccl_dtype(t.scalar_type(), nccl_.version);
  const ncclRedOp nop = nccl_op(op, t.scalar_type(), nccl_.version, &div);
  return enqueue(
      what, {t}, [&](cudaStream_t s) { return nccl_.AllReduce(t.data_ptr(), t.data_ptr(), count(t), dt, nop, comm_, s); },
      div ? divide(t, size()) : nullptr);
}

std::shared_ptr<Work> NcclProcessGroup::broadcast(torch::Tensor& t, int root) {
  if (root < 0 || root >= size())
    throw std::invalid_argument(name() + " group broadcast: root " + std::to_string(root) + " is not a rank of " +
                                std::to_string(size()));
  if (!on_gpu(*this, device_, "broadcast", {&t})) return cpu_->broadcast(t, root);
  const ncclDataType dt = nccl_dtype(t.scalar_type(), nccl_.version);
  return enqueue(name() + " group broadcast", {t}, [&](cudaStream_t s) {
    return nccl_.Broadcast(t.data_ptr(), t.data_ptr(), count(t), dt, root, comm_, s);
  });
}

std::shared_ptr<Work> NcclProcessGroup::allgather(torch::Tensor& out, const torch::Tensor& in) {
  if (!on_gpu(*this, device_, "allgather", {&out, &in})) return cpu_->allgather(out, in);
  if (out.numel() != in.numel() * size() || out.scalar_type() != in.scalar_type())
    throw std::invalid_argument(name() + " group allgather: output holds " + std::to_string(out.numel()) +
                                " elements, needs " + std::to_string(in.numel() * size()) + " of the input's dtype");
  const ncclDataType dt = nccl_dtype(in.scalar_type(), nccl_.version);
  return enqueue(name() + " group allgather", {out, in}, [&](cudaStream_t s) {
    return nccl_.AllGather(in.data_ptr(), out.data_ptr(), count(in), dt, comm_, s);
  });
}

std::shared_ptr<Work> NcclProcessGroup::reduce_scatter(torch::Tensor& out, const torch::Tensor& in, ReduceOp op) {
  if (!on_gpu(*this, device_, "reduce_scatter", {&out, &in})) return cpu_->reduce_scatter(out, in, op);
  if (in.numel() != out.numel() * size() || out.scalar_type() != in.scalar_type())
    throw std::invalid_argument(name() + " group reduce_scatter: input holds " + std::to_string(in.numel()) +
                                " elements, needs " + std::to_string(out.numel() * size()) + " of the output's dtype");
  bool div = false;
  const ncclDataType dt = nccl_dtype(in.scalar_type(), nccl_.version);
  const ncclRedOp nop = nccl_op(op, in.scalar_type(), nccl_.version, &div);
  return enqueue(
      name() + " group reduce_scatter", {out, in},
      [&](cudaStream_t s) { return nccl_.ReduceScatter(in.data_ptr(), out.data_ptr(), count(out), dt, nop, comm_, s); },
      div ? divide(out, size()) : nullptr);
}

std::shared_ptr<Work> NcclProcessGroup::send(const torch::Tensor& t, int dst, int tag) {
  if (!on_gpu(*this, device_, "send", {&t})) return cpu_->send(t, dst, tag);
  const ncclDataType dt = nccl_dtype(t.scalar_type(), nccl_.version);
  return enqueue(name() + " group send to " + std::to_string(dst), {t},
                 [&](cudaStream_t s) { return nccl_.Send(t.data_ptr(), count(t), dt, dst, comm_, s); });
}

std::shared_ptr<Work> NcclProcessGroup::recv(torch::Tensor& t, int src, int tag) {
  if (!on_gpu(*this, device_, "recv", {&t})) return cpu_->recv(t, src, tag);
  const ncclDataType dt = nccl_dtype(t.scalar_type(), nccl_.version);
  return enqueue(name() + " group recv from " + std::to_string(src), {t},
                 [&](cudaStream_t s) { return nccl_.Recv(t.data_ptr(), count(t), dt, src, comm_, s); });
}

void NcclProcessGroup::barrier() {
  // Everything this rank queued on the communication stream is done, then the ranks meet.
  if (stream_) cuda_.check(cuda_.StreamSynchronize(stream_), name() + " group barrier: cudaStreamSynchronize");
  cpu_->barrier();
}

}  // namespace shardtune
