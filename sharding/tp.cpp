#include "sharding/tp.h"

#include <stdexcept>

namespace shardtune {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

ProcessGroup* group_of(AutogradContext* ctx) {
  return reinterpret_cast<ProcessGroup*>(ctx->saved_data["group"].toInt());
}

torch::Tensor summed(ProcessGroup& g, const torch::Tensor& x) {
  torch::Tensor out = x.contiguous().clone();
  g.allreduce(out, ReduceOp::Sum)->wait();
  return out;
}

// f: identity forward, all-reduce (sum) of the gradient backward.
struct EnterRegion : torch::autograd::Function<EnterRegion> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x, int64_t group) {
    ctx->saved_data["group"] = group;
    return x.view_as(x);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    return {summed(*group_of(ctx), grad[0]), torch::Tensor()};
  }
};

// g: all-reduce (sum) forward, identity backward.
struct ReduceRegion : torch::autograd::Function<ReduceRegion> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x, int64_t group) {
    ctx->saved_data["group"] = group;
    return summed(*reinterpret_cast<ProcessGroup*>(group), x);
  }
  static variable_list backward(AutogradContext*, variable_list grad) { return {grad[0], torch::Tensor()}; }
};

struct MpiTensorParallel : TensorParallel {
  explicit MpiTensorParallel(std::shared_ptr<ProcessGroup> g) : group(std::move(g)) {
    rank = group->rank();
    size = group->size();
  }
  int64_t handle() const { return reinterpret_cast<int64_t>(group.get()); }
  torch::Tensor enter(const torch::Tensor& x) const override {
    return x.requires_grad() ? EnterRegion::apply(x, handle()) : x;
  }
  torch::Tensor reduce(const torch::Tensor& x) const override {
    return torch::GradMode::is_enabled() && x.requires_grad() ? ReduceRegion::apply(x, handle()) : summed(*group, x);
  }
  std::shared_ptr<ProcessGroup> group;
};

std::vector<int64_t> range(int64_t begin, int64_t end) {
  std::vector<int64_t> r;
  for (int64_t i = begin; i < end; ++i) r.push_back(i);
  return r;
}

// Keeps `index` along `dim` of the layer's weight (a copy, or fresh storage) and records it.
void shard(DenseLinear& layer, const std::string& path, DenseLinear::Split split, const std::vector<int64_t>& index,
           const std::shared_ptr<TensorParallel>& tp, bool keep_values, ShardMap& out) {
  const int64_t dim = split == DenseLinear::Split::Rows ? 0 : 1;
  torch::Tensor idx = torch::tensor(index, torch::kInt64);
  TensorShard s{dim, index, layer.weight.sizes().vec()};
  torch::NoGradGuard no_grad;
  torch::Tensor part;
  if (keep_values) {
    part = layer.weight.index_select(dim, idx);
  } else {
    auto shape = layer.weight.sizes().vec();
    shape[static_cast<size_t>(dim)] = static_cast<int64_t>(index.size());
    part = torch::empty(shape, layer.weight.options());
  }
  layer.weight.set_data(part);  // the full tensor is freed here (never touched without keep_values)
  layer.split = split;
  layer.shard_index = idx;
  layer.tp = tp;
  out[path + ".weight"] = std::move(s);
}

}  // namespace

std::shared_ptr<TensorParallel> make_tensor_parallel(std::shared_ptr<ProcessGroup> group) {
  return std::make_shared<MpiTensorParallel>(std::move(group));
}

ShardMap parallelize(VisionTransformerImpl& model, std::shared_ptr<TensorParallel> tp, bool keep_values) {
  const ViTConfig& c = model.config;
  const int n = tp->size, r = tp->rank;
  if (c.heads % n)
    throw std::invalid_argument("model.heads=" + std::to_string(c.heads) + " is not divisible by parallel.tp=" +
                                std::to_string(n));
  if (c.mlp_dim % n)
    throw std::invalid_argument("model.mlp_dim=" + std::to_string(c.mlp_dim) + " is not divisible by parallel.tp=" +
                                std::to_string(n));
  const int64_t D = c.dim, hd = c.head_dim(), heads = c.heads / n, M = c.mlp_dim / n;
  const int64_t cols0 = r * heads * hd, cols1 = (r + 1) * heads * hd;  // this rank's heads' channels
  std::vector<int64_t> qkv_rows;
  for (int64_t part = 0; part < 3; ++part)
    for (int64_t i = cols0; i < cols1; ++i) qkv_rows.push_back(part * D + i);
  using Split = DenseLinear::Split;
  ShardMap shards;
  for (size_t i = 0; i < model.num_blocks(); ++i) {
    Block b = model.block(i);
    const std::string p = "blocks." + std::to_string(model.block_index(i)) + ".";
    auto linear = [&](std::shared_ptr<Op>& op, const std::string& name) -> DenseLinear& {
      auto* d = dynamic_cast<DenseLinear*>(op.get());
      if (!d) throw std::logic_error("parallelize: " + p + name + " is not a plain Linear (parallelize before PEFT)");
      return *d;
    };
    shard(linear(b->attn->qkv, "attn.qkv"), p + "attn.qkv", Split::Rows, qkv_rows, tp, keep_values, shards);
    shard(linear(b->attn->proj, "attn.proj"), p + "attn.proj", Split::Cols, range(cols0, cols1), tp, keep_values, shards);
    shard(linear(b->mlp->fc1, "mlp.fc1"), p + "mlp.fc1", Split::Rows, range(r * M, (r + 1) * M), tp, keep_values, shards);
    shard(linear(b->mlp->fc2, "mlp.fc2"), p + "mlp.fc2", Split::Cols, range(r * M, (r + 1) * M), tp, keep_values, shards);
    b->attn->heads = heads;
    b->attn->first_head = r * heads;
    b->attn->tp = tp;
    for (auto* norm : {&b->attn->q_norm, &b->attn->k_norm})  // per-head norms work inside the region
      if (*norm) static_cast<LayerNormOp&>(**norm).tp = tp;
  }
  return shards;
}

}  // namespace shardtune
