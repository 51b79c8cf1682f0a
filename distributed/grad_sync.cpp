#include "distributed/grad_sync.h"

#include <stdexcept>

namespace shardtune {

GradSync::GradSync(std::vector<torch::Tensor> params, std::shared_ptr<ProcessGroup> dp, double bucket_mb)
    : params_(std::move(params)), dp_(std::move(dp)) {
  if (bucket_mb <= 0) throw std::invalid_argument("parallel.bucket_mb=" + std::to_string(bucket_mb) + " must be positive");
  const int64_t cap = static_cast<int64_t>(bucket_mb * 1024 * 1024);
  where_.resize(params_.size());
  // Reverse order: backward produces the last layers' gradients first.
  int64_t bytes = 0;
  for (size_t k = params_.size(); k-- > 0;) {
    const torch::Tensor& p = params_[k];
    if (!p.requires_grad()) throw std::invalid_argument("GradSync was given a frozen parameter; only trainable ones sync");
    const int64_t nbytes = p.numel() * p.element_size();
    bool fits = !buckets_.empty() && bytes + nbytes <= cap &&
                buckets_.back().flat.scalar_type() == p.scalar_type();
    if (!fits) {
      buckets_.emplace_back();
      buckets_.back().flat = torch::empty({0}, p.options().requires_grad(false));
      bytes = 0;
    }
    Bucket& b = buckets_.back();
    where_[k] = {buckets_.size() - 1, b.members.size()};
    b.offsets.push_back(b.flat.numel());
    b.members.push_back(k);
    b.flat = torch::empty({b.flat.numel() + p.numel()}, b.flat.options());
    bytes += nbytes;
  }
  if (dp_->size() > 1)
    for (size_t k = 0; k < params_.size(); ++k)
      params_[k].register_hook([this, k](torch::Tensor grad) {
        if (armed_) on_grad(k, grad);
        return grad;
      });
}

int64_t GradSync::bytes_per_step() const {
  if (dp_->size() == 1) return 0;
  int64_t n = 0;
  for (const auto& b : buckets_) n += b.flat.numel() * b.flat.element_size();
  return n;
}

std::vector<std::vector<size_t>> GradSync::bucket_members() const {
  std::vector<std::vector<size_t>> out;
  for (const auto& b : buckets_) out.push_back(b.members);
  return out;
}

void GradSync::prepare_for_backward() {
  if (dp_->size() == 1) return;
  for (auto& b : buckets_) {
    b.pending = static_cast<int>(b.members.size());
    b.work.reset();
  }
  armed_ = true;
}

void GradSync::on_grad(size_t param, const torch::Tensor& grad) {
  auto [bi, mi] = where_[param];
  Bucket& b = buckets_[bi];
  const torch::Tensor& p = params_[param];
  torch::NoGradGuard no_grad;
  torch::Tensor slot = b.flat.narrow(0, b.offsets[mi], p.numel());
  // The hook sees this backward's gradient before it is added to .grad (earlier micro-batches).
  if (p.grad().defined()) {
    torch::add_out(slot, p.grad().reshape({-1}), grad.reshape({-1}));
  } else {
    slot.copy_(grad.reshape({-1}));
  }
  if (--b.pending == 0) launch(b);
}

void GradSync::launch(Bucket& b) { b.work = dp_->allreduce(b.flat, ReduceOp::Avg); }

void GradSync::finish() {
  if (dp_->size() == 1) return;
  torch::NoGradGuard no_grad;
  for (auto& b : buckets_) {
    if (b.work) continue;  // started by the hooks
    for (size_t m = 0; m < b.members.size(); ++m) {  // pack from .grad
      const torch::Tensor& p = params_[b.members[m]];
      torch::Tensor slot = b.flat.narrow(0, b.offsets[m], p.numel());
      if (p.grad().defined()) slot.copy_(p.grad().reshape({-1}));
      else slot.zero_();
    }
    launch(b);
  }
  for (auto& b : buckets_) {
    b.work->wait();
    for (size_t m = 0; m < b.members.size(); ++m) {
      torch::Tensor& p = params_[b.members[m]];
      torch::Tensor avg = b.flat.narrow(0, b.offsets[m], p.numel()).view(p.sizes());
      if (p.grad().defined()) p.mutable_grad().copy_(avg);
      else p.mutable_grad() = avg.clone();
    }
    b.work.reset();
  }
  armed_ = false;
}

}  // namespace shardtune
