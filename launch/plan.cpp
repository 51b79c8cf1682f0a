#include "launch/plan.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <stdexcept>

#include "distributed/parallel_dims.h"
#include "peft/peft_count.h"

namespace shardtune {

namespace {

std::string gb(double bytes) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.2f GB", bytes / 1e9);
  return buf;
}

std::string mb(double bytes) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.1f MB", bytes / 1e6);
  return buf;
}

// Parameters of one block held by one TP rank: the four matrices and the column-parallel
// biases split, the rest (norms, row-parallel biases, layer scales) replicated.
double block_params_per_rank(const ViTConfig& m, int tp) {
  const double D = static_cast<double>(m.dim), M = static_cast<double>(m.mlp_dim);
  const double split = 4 * D * D + 2 * D * M + (m.qkv_bias ? 3 * D : 0) + M;
  const double whole = static_cast<double>(m.block_param_count()) - split;
  return split / tp + whole;
}

// Elements autograd keeps per block per image for a frozen block's step (see the header):
// 3 N D + (10 N D + N M + H N^2) / tp.
double kept_per_block(const ViTConfig& m, int tp) {
  const double N = static_cast<double>(m.num_tokens()), D = static_cast<double>(m.dim),
               M = static_cast<double>(m.mlp_dim), H = static_cast<double>(m.heads);
  return 3 * N * D + (10 * N * D + N * M + H * N * N) / tp;
}

// Whether autograd runs through the backbone's blocks (keeps their activations): not for a
// frozen backbone read by the head alone (linear, none) or by a side network (lst).
bool backward_through_blocks(const std::string& method) {
  return method != "linear" && method != "none" && method != "lst";
}

// lst, per image: the side network's forward FLOPs (ladders + narrow blocks) and what its
// autograd keeps per ladder (the ladder's input x_i [N, D], which its weight gradient needs,
// and the side block's activations by the backbone's per-block rule at width w, not split
// over tp: the side stream is replicated).
struct SideCost {
  double flops_per_image = 0, keep_per_ladder = 0;
  int64_t ladders = 0;
};
SideCost side_cost(const ViTConfig& m, const PeftConfig& p) {
  const ViTConfig s = side_config(m, p);
  const double N = static_cast<double>(m.num_tokens()), D = static_cast<double>(m.dim), w = static_cast<double>(s.dim);
  SideCost c;
  c.ladders = static_cast<int64_t>(side_block_set(p, m.depth).size());
  c.flops_per_image = 2 * N * D * w * static_cast<double>(c.ladders + 1) +
                      s.block_forward_flops_per_image() * static_cast<double>(c.ladders);
  c.keep_per_ladder = N * D + kept_per_block(s, 1);
  return c;
}

}  // namespace

double parse_bytes(const std::string& text) {
  size_t used = 0;
  double v = 0;
  try {
    v = std::stod(text, &used);
  } catch (const std::exception&) {
    throw std::invalid_argument("--device-memory=" + text + " is not a size like 80GB");
  }
  std::string unit = text.substr(used);
  double scale = 1;
  if (unit.empty() || unit == "B") scale = 1;
  else if (unit == "KB") scale = 1e3;
  else if (unit == "MB") scale = 1e6;
  else if (unit == "GB") scale = 1e9;
  else if (unit == "TB") scale = 1e12;
  else if (unit == "KiB") scale = 1024.0;
  else if (unit == "MiB") scale = 1024.0 * 1024;
  else if (unit == "GiB") scale = 1024.0 * 1024 * 1024;
  else throw std::invalid_argument("--device-memory=" + text + ": unknown unit '" + unit + "' (B, MB, GB, MiB, GiB, ...)");
  if (v <= 0) throw std::invalid_argument("--device-memory=" + text + " must be positive");
  return v * scale;
}

PlanResult plan_mesh(const PlanInput& in, int tp, int pp) {
  MeshRequirements req;
  req.heads = in.model.heads;
  req.depth = in.model.depth;
  req.global_batch = in.global_batch;
  req.microbatches = in.microbatches;
  ParallelDims dims = ParallelDims::make(in.world, tp, pp, req);
  if (in.schedule != "gpipe" && in.schedule != "1f1b")
    throw std::invalid_argument("parallel.schedule=" + in.schedule + " must be gpipe or 1f1b");

  const ViTConfig& m = in.model;
  PlanResult r;
  r.dp = dims.dp;
  r.tp = tp;
  r.pp = pp;
  r.micro_batch = in.global_batch / (dims.dp * in.microbatches);
  r.trainable_params = trainable_param_count(m, in.peft);
  const bool full = in.peft.method == "full";
  const double act_bytes = in.precision == "bf16" ? 2 : 4;
  const double frozen_elem_bytes = full ? 0 : act_bytes;  // full: every weight is in the PEFT state
  const double N = static_cast<double>(m.num_tokens()), D = static_cast<double>(m.dim),
               M = static_cast<double>(m.mlp_dim), H = static_cast<double>(m.heads);
  const double mb_images = static_cast<double>(r.micro_batch);
  const bool backward = backward_through_blocks(in.peft.method);
  const bool lst = in.peft.method == "lst";
  const SideCost side = lst ? side_cost(m, in.peft) : SideCost{};

  // Per block per image, elements autograd keeps (see the header); full also keeps the
  // inputs of every linear for the weight gradients.
  double keep = kept_per_block(m, tp);
  if (full) keep += N * D + (N * D + N * M) / tp;
  // One block's transient peak for a micro-batch: scores and their gradient, the MLP hidden
  // and its gradient, q k v.
  const double transient = (2 * H * N * N + 2 * N * M + 3 * N * D) / tp * mb_images * act_bytes;

  const double patch_params = D * m.in_chans * m.patch_size * m.patch_size + D + D + N * D;
  const double head_params = 2 * D + (m.num_classes > 0 ? D * m.num_classes + m.num_classes : 0);

  // The worst stage decides: every stage is sized and the largest kept.
  PlanResult worst = r;
  double worst_total = -1;
  for (int s = 0; s < pp; ++s) {
    const int64_t first = m.depth * s / pp, last = m.depth * (s + 1) / pp;
    const double blocks = static_cast<double>(last - first);
    double params = blocks * block_params_per_rank(m, tp);
    if (s == 0) params += patch_params;
    if (s == pp - 1) params += head_params;
    PlanResult c = r;
    c.frozen_bytes = params * frozen_elem_bytes;
    // Full fine-tuning trains the stage's own shard; PEFT parameters are few and counted whole
    // on every rank (an upper bound: most are split over stages).
    c.peft_bytes = (full ? params : static_cast<double>(r.trainable_params)) * 16.0;
    const double in_flight =
        in.schedule == "gpipe" ? static_cast<double>(in.microbatches)
                               : static_cast<double>(std::min<int64_t>(pp - s, in.microbatches));
    c.activation_bytes = backward ? keep * blocks * mb_images * in_flight * act_bytes : 0;
    if (lst) {  // the side stream only, for the ladders of this stage's blocks
      double ladders = 0;
      for (int64_t b : side_block_set(in.peft, m.depth)) ladders += b >= first && b < last ? 1 : 0;
      c.activation_bytes = side.keep_per_ladder * ladders * mb_images * in_flight * act_bytes;
    }
    c.workspace_bytes = transient + kRuntimeBytes;
    if (c.total_bytes() > worst_total) worst_total = c.total_bytes(), worst = c;
  }
  r = worst;

  // Communication per rank per step.
  const double blocks_per_stage = std::ceil(static_cast<double>(m.depth) / pp);
  const double act_msg = mb_images * N * D * act_bytes;
  const double ring = tp > 1 ? 2.0 * (tp - 1) / tp : 0.0;
  r.tp_allreduce_bytes = ring * act_msg * blocks_per_stage * (backward ? 4 : 2) * static_cast<double>(in.microbatches);
  r.pp_send_bytes = pp > 1 ? act_msg * (backward ? 2 : 1) * static_cast<double>(in.microbatches) : 0;
  if (lst && pp > 1) {  // [x | h] forward, dh back
    const double w = static_cast<double>(side_config(m, in.peft).dim);
    r.pp_send_bytes = mb_images * N * ((D + w) + w) * act_bytes * static_cast<double>(in.microbatches);
  }
  r.dp_sync_bytes = dims.dp > 1 ? 4.0 * static_cast<double>(r.trainable_params) : 0;
  r.flops_per_step = m.forward_flops_per_image() * static_cast<double>(in.global_batch) * (full ? 3.0 : 2.0);
  if (lst)  // the backbone forward only; the side network forward and backward (weight and input gradients)
    r.flops_per_step = (m.forward_flops_per_image() + 3 * side.flops_per_image) * static_cast<double>(in.global_batch);
  r.bubble = static_cast<double>(pp - 1) / static_cast<double>(in.microbatches + pp - 1);
  r.fits = r.total_bytes() <= in.device_memory_bytes;
  return r;
}

PlanResult plan(const PlanInput& in, std::vector<std::string>* reasoning) {
  if (in.tp > 0 || in.pp > 0) return plan_mesh(in, std::max(1, in.tp), std::max(1, in.pp));
  struct Candidate {
    int tp, pp;
  };
  std::vector<Candidate> cands;
  for (int tp : {1, 2, 4, 8})
    for (int pp = 1; pp <= in.model.depth; ++pp) cands.push_back({tp, pp});
  std::stable_sort(cands.begin(), cands.end(), [](const Candidate& a, const Candidate& b) {
    return a.tp * a.pp != b.tp * b.pp ? a.tp * a.pp < b.tp * b.pp : a.tp > b.tp;  // fewer ranks a replica; tp first
  });
  for (const auto& c : cands) {
    if (in.world % (c.tp * c.pp) != 0 || in.model.heads % c.tp != 0) continue;
    PlanResult r;
    try {
      r = plan_mesh(in, c.tp, c.pp);
    } catch (const std::invalid_argument& e) {
      if (reasoning) reasoning->push_back("tp=" + std::to_string(c.tp) + " pp=" + std::to_string(c.pp) + ": " + e.what());
      continue;
    }
    if (reasoning)
      reasoning->push_back("tp=" + std::to_string(c.tp) + " pp=" + std::to_string(c.pp) + " (dp=" + std::to_string(r.dp) +
                           "): " + gb(r.total_bytes()) + " per rank " + (r.fits ? "<= " : "> ") +
                           gb(in.device_memory_bytes) + (r.fits ? ": fits" : ""));
    if (r.fits) return r;
  }
  throw std::invalid_argument("no tp x pp mesh of " + std::to_string(in.world) + " ranks fits " +
                              gb(in.device_memory_bytes) + " per rank for " + in.model.arch +
                              " (raise --world-size or --device-memory, lower data.batch_size, or use bf16)");
}

std::string format_plan(const PlanInput& in, const PlanResult& r) {
  char buf[2048];
  std::snprintf(
      buf, sizeof(buf),
      "plan for %s (%.3g B parameters), peft.method=%s, %s, world=%d\n"
      "  mesh                dp=%d tp=%d pp=%d; micro-batch %lld images x %lld micro-batches (%s)\n"
      "  memory per rank     %s  (the most loaded stage)\n"
      "    frozen shard      %s\n"
      "    PEFT state        %s  (%lld trainable x 16 bytes: param, grad, 2 AdamW moments)\n"
      "    activations       %s\n"
      "    workspace         %s  (one block's transients + %s runtime)\n"
      "  communication per rank per step\n"
      "    TP all-reduces    %s\n"
      "    PP send/recv      %s\n"
      "    DP gradient sync  %s\n"
      "  model FLOPs / step  %.3g TFLOP (%s of %lld images)\n"
      "  pipeline bubble     %.1f%%  ((p-1)/(m+p-1))\n"
      "  device memory       %s: %s\n",
      in.model.arch.c_str(), static_cast<double>(in.model.param_count()) / 1e9, in.peft.method.c_str(),
      in.precision.c_str(), in.world, r.dp, r.tp, r.pp, static_cast<long long>(r.micro_batch),
      static_cast<long long>(in.microbatches), in.schedule.c_str(), gb(r.total_bytes()).c_str(), gb(r.frozen_bytes).c_str(),
      mb(r.peft_bytes).c_str(), static_cast<long long>(r.trainable_params), gb(r.activation_bytes).c_str(),
      gb(r.workspace_bytes).c_str(), mb(kRuntimeBytes).c_str(), mb(r.tp_allreduce_bytes).c_str(),
      mb(r.pp_send_bytes).c_str(), mb(r.dp_sync_bytes).c_str(), r.flops_per_step / 1e12,
      in.peft.method == "full"  ? "3 x forward"
      : in.peft.method == "lst" ? "forward + 3 x the side network's forward"
                                : "2 x forward",
      static_cast<long long>(in.global_batch), 100.0 * r.bubble,
      gb(in.device_memory_bytes).c_str(), r.fits ? "fits" : "does NOT fit");
  return buf;
}

}  // namespace shardtune
