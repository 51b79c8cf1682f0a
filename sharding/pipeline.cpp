#include "sharding/pipeline.h"

#include <algorithm>
#include <chrono>
#include <map>
#include <stdexcept>

namespace shardtune {

namespace {

constexpr int kMaxDims = 6;
constexpr int kHeaderTag = 7001, kDataTag = 7002;

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

std::vector<PipeOp> pipeline_schedule(const std::string& name, int stage, int stages, int microbatches) {
  if (stages < 1 || stage < 0 || stage >= stages || microbatches < 1)
    throw std::invalid_argument("pipeline schedule: stage " + std::to_string(stage) + " of " + std::to_string(stages) +
                                " with " + std::to_string(microbatches) + " micro-batches");
  std::vector<PipeOp> ops;
  if (name == "gpipe") {
    for (int m = 0; m < microbatches; ++m) ops.push_back({PipeOp::Forward, m});
    for (int m = 0; m < microbatches; ++m) ops.push_back({PipeOp::Backward, m});
  } else if (name == "1f1b") {
    const int warmup = std::min(stages - 1 - stage, microbatches);
    int f = 0, b = 0;
    for (; f < warmup; ++f) ops.push_back({PipeOp::Forward, f});
    for (; f < microbatches; ++f, ++b) {
      ops.push_back({PipeOp::Forward, f});
      ops.push_back({PipeOp::Backward, b});
    }
    for (; b < microbatches; ++b) ops.push_back({PipeOp::Backward, b});
  } else {
    throw std::invalid_argument("parallel.schedule=" + name + " is not one of gpipe, 1f1b");
  }
  return ops;
}

double ideal_bubble(int stages, int microbatches) {
  return static_cast<double>(stages - 1) / static_cast<double>(microbatches + stages - 1);
}

std::vector<std::shared_ptr<Work>> send_tensor(ProcessGroup& g, const torch::Tensor& t, int dst,
                                               std::vector<torch::Tensor>& keep_alive) {
  if (t.dim() > kMaxDims) throw std::invalid_argument("send_tensor: more than 6 dims");
  torch::Tensor header = torch::zeros({2 + kMaxDims}, torch::kInt64);
  auto* h = header.data_ptr<int64_t>();
  h[0] = static_cast<int64_t>(t.scalar_type());
  h[1] = t.dim();
  for (int64_t d = 0; d < t.dim(); ++d) h[2 + d] = t.size(d);
  torch::Tensor data = t.detach().contiguous();
  keep_alive.push_back(header);
  keep_alive.push_back(data);
  return {g.send(header, dst, kHeaderTag), g.send(data, dst, kDataTag)};
}

torch::Tensor recv_tensor(ProcessGroup& g, int src) {
  torch::Tensor header = torch::zeros({2 + kMaxDims}, torch::kInt64);
  g.recv(header, src, kHeaderTag)->wait();
  const auto* h = header.data_ptr<int64_t>();
  std::vector<int64_t> shape(h + 2, h + 2 + h[1]);
  torch::Tensor t = torch::empty(shape, torch::TensorOptions().dtype(static_cast<torch::ScalarType>(h[0])));
  g.recv(t, src, kDataTag)->wait();
  return t;
}

PipelineTimes run_pipeline(const std::vector<PipeOp>& ops, const StageRole& role, const StageHooks& hooks,
                           ProcessGroup* pp) {
  const auto start = std::chrono::steady_clock::now();
  PipelineTimes times;
  struct InFlight {
    torch::Tensor input, output;  // output: the stage's activations, or the last stage's loss
  };
  std::map<int, InFlight> alive;
  std::vector<std::shared_ptr<Work>> sends;
  std::vector<torch::Tensor> send_buffers;
  auto receive = [&](int src) {
    const auto t0 = std::chrono::steady_clock::now();
    torch::Tensor t = recv_tensor(*pp, src);
    times.wait_s += seconds_since(t0);
    return t;
  };
  auto send = [&](const torch::Tensor& t, int dst, double& bytes) {
    bytes += static_cast<double>(t.numel() * t.element_size());
    for (auto& w : send_tensor(*pp, t, dst, send_buffers)) sends.push_back(w);
  };
  // The part of a stage's activations that carries a gradient.
  auto with_grad = [&](const torch::Tensor& t) {
    return role.grad_tail > 0 ? t.narrow(-1, t.size(-1) - role.grad_tail, role.grad_tail) : t;
  };
  int last_backward = -1;
  for (size_t i = 0; i < ops.size(); ++i)
    if (ops[i].kind == PipeOp::Backward) last_backward = static_cast<int>(i);

  for (size_t i = 0; i < ops.size(); ++i) {
    const PipeOp& op = ops[i];
    if (op.kind == PipeOp::Forward) {
      torch::Tensor x = role.first() ? hooks.input(op.microbatch) : receive(role.stage - 1);
      if (role.input_grad) x.requires_grad_(true);
      torch::Tensor out;
      {
        torch::AutoGradMode grad(role.backward);  // no autograd (and nothing kept) before the first trainable
        out = hooks.forward(x);
        if (role.last()) out = hooks.loss(op.microbatch, out);
      }
      if (!role.last()) send(out, role.stage + 1, times.forward_bytes);
      if (role.backward) alive[op.microbatch] = {x, out};
    } else {
      if (!role.backward) continue;
      auto it = alive.find(op.microbatch);
      if (it == alive.end()) throw std::logic_error("pipeline: backward of micro-batch " + std::to_string(op.microbatch) + " before its forward");
      if (static_cast<int>(i) == last_backward && hooks.before_last_backward) hooks.before_last_backward();
      if (role.last()) {
        it->second.output.backward();
      } else {
        torch::Tensor grad = receive(role.stage + 1);
        torch::autograd::backward({with_grad(it->second.output)}, {grad.to(it->second.output.scalar_type())});
      }
      if (role.input_grad) send(with_grad(it->second.input.grad()), role.stage - 1, times.backward_bytes);
      alive.erase(it);  // its activations are freed here
    }
  }
  const auto t0 = std::chrono::steady_clock::now();
  for (auto& w : sends) w->wait();
  times.wait_s += seconds_since(t0);
  times.total_s = seconds_since(start);
  return times;
}

torch::Tensor pipeline_forward(const torch::Tensor& input, const StageRole& role,
                               const std::function<torch::Tensor(const torch::Tensor&)>& forward, ProcessGroup* pp) {
  torch::NoGradGuard no_grad;
  torch::Tensor x = role.first() ? input : recv_tensor(*pp, role.stage - 1);
  torch::Tensor out = forward(x);
  if (role.last()) return out;
  std::vector<torch::Tensor> keep;
  for (auto& w : send_tensor(*pp, out, role.stage + 1, keep)) w->wait();
  return torch::Tensor();
}

}  // namespace shardtune
