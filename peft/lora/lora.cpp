// LoRA (Hu et al.): y = base(x) + B A dropout(x) * alpha/r on chosen output rows.
// A [r, in] ~ U(+-1/sqrt(in)) as torch.nn.Linear, B [rows, r] = 0, so step 0 equals the
// base model. On a fused attn.qkv the update covers only the parts in peft.qkv_parts
// (q and v by default, as in the VTAB-1k LoRA results), one (A, B) pair per part, named
// lora_A_q / lora_B_q; elsewhere (and on qkv with qkv_parts=all) one pair over all rows,
// named lora_A / lora_B as Hugging Face PEFT names them. r and alpha may differ per module
// (peft.rank_pattern / alpha_pattern); alpha / sqrt(r) with peft.rslora.
//
// Over a tensor-parallel base every rank keeps the full A and B and uses its part: over a
// column-parallel base A whole and B's rows of this rank's outputs; over a row-parallel
// base A's columns of this rank's inputs and B whole, the update added to the partial
// output before the all-reduce. Both enter the region through f, so their gradients are
// summed over the tp group.
#include "peft/lora/lora.h"

#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <cmath>
#include <regex>
#include <stdexcept>

#include "peft/method.h"
#include "peft/targets.h"

namespace shardtune {

namespace {

struct LoraPair {
  int64_t offset, rows;  // output rows [offset, offset + rows) of the base layer
  torch::Tensor A, B;    // A [r, in], B [rows, r]
};

// y[..., start_i : start_i + count_i] += scaling * B_i A_i x for every pair i, in place on the
// base output y, as two GEMMs for all pairs together: u = x [A_1; A_2; ...]^T, then
// y += scaling * u Bd^T with Bd the pairs' B placed block-diagonally over y's columns (zeros
// elsewhere; the extra multiply-adds are r * out per token, noise beside the base GEMM).
// The forward GEMMs read and write whole dense matrices: on column slices of y oneDNN 2.6
// leaves its brgemm kernels for a slower generic one (`ONEDNN_VERBOSE=1` names the kernel:
// gemm:jit instead of brg:avx512_core_bf16). The B gradients are the exception, one GEMM per
// pair on its slice of dy: a third of the work there beats the whole block-diagonal product
// (ViT-B qkv: 0.21 against 0.74 ms, /usr/bin/python3 timing). Through autograd's ops the same also
// costs a clone of the whole dy (CopySlices, for the in-place slice adds) and a dozen
// small nodes. `ab` = [A_1, B_1, A_2, B_2, ...] as the
// layer uses them (A [r, in], B [count_i, r], any dtype: cast to x's); gradients come back
// in their dtypes.
struct LoraAddInPlace : torch::autograd::Function<LoraAddInPlace> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, torch::Tensor y, const torch::Tensor& x,
                               torch::TensorList ab, std::vector<int64_t> starts, double scaling) {
    const int64_t pairs = static_cast<int64_t>(starts.size()), r = ab[0].size(0);
    const auto dtype = x.scalar_type();
    std::vector<torch::Tensor> as;
    for (int64_t i = 0; i < pairs; ++i) as.push_back(ab[2 * i].to(dtype));
    torch::Tensor bd = torch::zeros({y.size(-1), pairs * r}, x.options());  // [out, pairs * r]
    for (int64_t i = 0; i < pairs; ++i) {
      const torch::Tensor& b = ab[2 * i + 1];
      bd.narrow(0, starts[i], b.size(0)).narrow(1, i * r, r).copy_(b);
    }
    torch::Tensor x2d = x.reshape({-1, x.size(-1)});
    torch::Tensor a_cat = torch::cat(as, 0);  // [pairs * r, in]
    torch::Tensor u = x2d.mm(a_cat.t());      // [M, pairs * r]
    y.view({-1, y.size(-1)}).addmm_(u, bd.t(), 1.0, scaling);
    ctx->mark_dirty({y});
    ctx->save_for_backward({x2d, a_cat, u, bd});
    ctx->saved_data["starts"] = starts;
    std::vector<int64_t> counts;
    for (int64_t i = 0; i < pairs; ++i) counts.push_back(ab[2 * i + 1].size(0));
    ctx->saved_data["counts"] = counts;
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["x_sizes"] = x.sizes().vec();
    ctx->saved_data["a_dtype"] = static_cast<int64_t>(ab[0].scalar_type());
    ctx->saved_data["b_dtype"] = static_cast<int64_t>(ab[1].scalar_type());
    return y;
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor &x2d = saved[0], &a_cat = saved[1], &u = saved[2], &bd = saved[3];
    const auto starts = ctx->saved_data["starts"].toIntVector();
    const auto counts = ctx->saved_data["counts"].toIntVector();
    const double scaling = ctx->saved_data["scaling"].toDouble();
    const auto a_dtype = static_cast<torch::ScalarType>(ctx->saved_data["a_dtype"].toInt());
    const auto b_dtype = static_cast<torch::ScalarType>(ctx->saved_data["b_dtype"].toInt());
    const int64_t pairs = static_cast<int64_t>(starts.size()), r = a_cat.size(0) / pairs;
    const torch::Tensor& dy = grads[0];
    torch::Tensor dy2d = dy.reshape({-1, dy.size(-1)});
    torch::Tensor du = dy2d.mm(bd).mul_(scaling);              // [M, pairs * r]
    torch::Tensor da = du.t().mm(x2d);                         // [pairs * r, in]
    // y: the add passes dy through; x: the down-projections' input gradient
    torch::autograd::tensor_list out{dy, du.mm(a_cat).view(ctx->saved_data["x_sizes"].toIntVector())};
    for (int64_t i = 0; i < pairs; ++i) {
      out.push_back(da.narrow(0, i * r, r).to(a_dtype));
      // dB_i = dy[:, its columns]^T u_i, as (u_i^T dy[:, its columns])^T: only B_i's block of
      // the block-diagonal (the whole dy^T u computed the zero blocks too, at 3.5x the time on
      // a ViT-B qkv), in the orientation oneDNN runs fastest on a column slice of dy.
      torch::Tensor u_i = u.narrow(1, i * r, r).contiguous();
      torch::Tensor db_t = u_i.t().mm(dy2d.narrow(1, starts[i], counts[i])).mul_(scaling);  // [r, rows]
      out.push_back(db_t.t().to(b_dtype).contiguous());
    }
    out.push_back(torch::Tensor());  // starts
    out.push_back(torch::Tensor());  // scaling
    return out;
  }
};

struct LoraLinear : Op, Mergeable {
  LoraLinear(std::shared_ptr<Op> base_op, const LoraShape& shape, double dropout,
             const std::vector<std::pair<std::string, int64_t>>& parts)
      : scaling(shape.scaling), dropout_p(dropout) {
    base = register_module("base_layer", std::move(base_op));
    dense = dynamic_cast<DenseLinear*>(base.get());
    if (!dense) throw std::logic_error("LoRA wraps a plain Linear");
    const int64_t in = dense->in_features, out = dense->out_features;
    const int64_t rows = parts.empty() ? out : out / 3;
    auto add_pair = [&](const std::string& suffix, int64_t offset) {
      auto a = register_module("lora_A" + suffix, std::make_shared<torch::nn::Module>());
      auto b = register_module("lora_B" + suffix, std::make_shared<torch::nn::Module>());
      LoraPair p{offset, rows, a->register_parameter("weight", torch::empty({shape.rank, in})),
                 b->register_parameter("weight", torch::zeros({rows, shape.rank}))};
      kaiming_uniform_linear_(p.A);
      pairs.push_back(p);
    };
    if (parts.empty()) add_pair("", 0);
    for (const auto& [name, index] : parts) add_pair("_" + name, index * rows);
  }

  torch::Tensor forward(const torch::Tensor& x) override {
    if (merged) return base->forward(x);
    torch::Tensor xe = dense->enter(x);
    torch::Tensor y = dense->local(xe);
    torch::Tensor xin = dropout_p > 0 ? torch::dropout(xe, dropout_p, is_training()) : xe;
    // Each pair's A and B as this rank uses them (tensor parallelism: its columns / rows).
    std::vector<torch::Tensor> ab;
    std::vector<int64_t> starts;
    for (const auto& p : pairs) {
      auto [start, count] = dense->local_range(p.offset, p.rows);
      if (count == 0) continue;
      ab.push_back(dense->in_cols(dense->region(p.A), 1));
      ab.push_back(dense->out_rows(dense->region(p.B), p.offset));
      starts.push_back(start);
    }
    // The base outputs are dense. Where one is a view (torch::linear's on a 3-D input),
    // autograd wraps this in-place update in a CopySlices node: slower, equally exact.
    if (!starts.empty()) y = LoraAddInPlace::apply(y, xin, torch::TensorList(ab), starts, scaling);
    return dense->leave(y);
  }

  void apply(double sign) {
    for (const auto& p : pairs) {
      auto [start, count] = dense->local_range(p.offset, p.rows);
      torch::Tensor d = dense->in_cols(dense->out_rows(torch::matmul(p.B, p.A), p.offset), 1);
      dense->weight.narrow(0, start, count).add_(d.to(dense->weight.scalar_type()), sign * scaling);
    }
  }
  void merge() override { apply(+1); }
  void unmerge() override { apply(-1); }

  std::shared_ptr<Op> base;
  DenseLinear* dense;  // base, as a linear layer
  std::vector<LoraPair> pairs;
  double scaling, dropout_p;
};

struct Lora : Method {
  bool mergeable() const override { return true; }

  ParamList inject(VisionTransformerImpl& model, const PeftConfig& cfg) const override {
    if (cfg.rank <= 0) throw std::invalid_argument("peft.rank=" + std::to_string(cfg.rank) + " must be positive");
    if (cfg.dropout < 0 || cfg.dropout >= 1)
      throw std::invalid_argument("peft.dropout=" + std::to_string(cfg.dropout) + " must be in [0, 1)");
    const auto parts = qkv_parts(cfg.qkv_parts);
    reject_other_kinds(model, cfg);
    ParamList owned;
    for (const Slot& s : target_slots(model, cfg, "attn.qkv", {Slot::Kind::Linear})) {
      seed_peft_init(s.path);
      bool fused_qkv = s.name == "qkv";
      auto layer = std::make_shared<LoraLinear>(*s.member, lora_shape(cfg, s.path), cfg.dropout,
                                                fused_qkv ? parts : std::vector<std::pair<std::string, int64_t>>{});
      for (const auto& p : layer->pairs) {
        owned.push_back(p.A);
        owned.push_back(p.B);
      }
      s.replace(layer);
    }
    return owned;
  }

  // A target name that names a LayerNorm or the head is an error, not a silent "matches no
  // module". (A regex picks the Linear layers among what it matches.)
  static void reject_other_kinds(VisionTransformerImpl& model, const PeftConfig& cfg) {
    if (cfg.targets.empty() || cfg.targets.rfind("re:", 0) == 0) return;
    std::vector<std::string> others;
    for (const Slot& s : slots(model))
      if (s.kind != Slot::Kind::Linear || s.path == "head") others.push_back(s.path);
    const auto hit = match_targets(others, cfg.targets, "", /*require_match=*/false);
    if (!hit.empty())
      throw std::invalid_argument("peft.targets=" + cfg.targets + " names " + hit.front() +
                                  (hit.front() == "head" ? ", the classifier head (train it with peft.train_head)"
                                                         : ", which is not a Linear layer") +
                                  ": LoRA wraps the blocks' Linear layers (attn.qkv, attn.proj, mlp.fc1, mlp.fc2)");
  }
};

}  // namespace

bool pattern_matches(const std::string& key, const std::string& path) {
  try {
    return std::regex_match(path, std::regex("(.*\\.)?(" + key + ")"));
  } catch (const std::regex_error& e) {
    throw std::invalid_argument("LoRA pattern key '" + key + "' is not a valid regex: " + e.what());
  }
}

namespace {
// The value of the first key of `patterns` that matches `path`, else `fallback`.
template <typename T>
T first_match(const std::vector<std::pair<std::string, T>>& patterns, const std::string& path, T fallback) {
  for (const auto& [key, value] : patterns)
    if (pattern_matches(key, path)) return value;
  return fallback;
}
}  // namespace

LoraShape lora_shape(const PeftConfig& cfg, const std::string& path) {
  LoraShape s{first_match(cfg.rank_pattern, path, cfg.rank), first_match(cfg.alpha_pattern, path, cfg.alpha), 0};
  if (s.rank <= 0)
    throw std::invalid_argument("peft.rank_pattern gives " + path + " rank " + std::to_string(s.rank) +
                                ": it must be positive");
  s.scaling = s.alpha / (cfg.rslora ? std::sqrt(static_cast<double>(s.rank)) : static_cast<double>(s.rank));
  return s;
}

std::vector<std::pair<std::string, int64_t>> qkv_parts(const std::string& spec) {
  if (spec == "all") return {};
  std::vector<std::pair<std::string, int64_t>> parts;
  for (const auto& p : split_list(spec)) {
    const int64_t index = p == "q" ? 0 : p == "k" ? 1 : p == "v" ? 2 : -1;
    if (index < 0) throw std::invalid_argument("peft.qkv_parts=" + spec + ": '" + p + "' is not q, k, v or all");
    for (const auto& [_, i] : parts)
      if (i == index) throw std::invalid_argument("peft.qkv_parts=" + spec + ": '" + p + "' is named twice");
    parts.emplace_back(p, index);
  }
  if (parts.empty()) throw std::invalid_argument("peft.qkv_parts is empty (q, k, v or all)");
  std::sort(parts.begin(), parts.end(), [](const auto& a, const auto& b) { return a.second < b.second; });
  return parts;
}

void register_lora(MethodRegistry& r) { r.add("lora", std::make_unique<Lora>()); }

}  // namespace shardtune
