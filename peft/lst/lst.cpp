// Ladder Side-Tuning (Sung, Cho, Bansal, NeurIPS 2022), adapted to the ViT: a narrow
// transformer beside the frozen backbone, fed by "ladders" from the backbone's block outputs;
// backpropagation runs through the side network only, never through the backbone.
//
//   h_0 = side_in(x_0)                       x_0: the embedding's tokens [B, T, D]
//   h_i = side_block_i(mu_i h + (1 - mu_i) down_i(x_i))   for each block i of peft.side_blocks
//   mu_i = sigmoid(alpha_i / 0.1), alpha_i = 0 at init  (LST's gate, temperature and init)
//   features = norm(pool(x_L)) + up(side_norm(pool(h_L))),  logits = head(features)
//
// Choices against the paper (ylsung/Ladder-Side-Tuning):
// - width w = D / peft.side_reduction (LST: r = 8); side blocks are pre-norm ViT blocks of
//   width w with max(1, w / 64) heads (a divisor of w) and the backbone's MLP ratio;
// - down_i and side_in are Linear(D, w) with bias (LST's scripts: bias on), PyTorch's Linear
//   init; side blocks take timm's init (trunc_normal 0.02, zero biases), i.e. random: LST
//   prunes the backbone's weights by Fisher importance, which needs the full weights on one
//   rank and a pass over labelled data before training; not done;
// - the output: LST feeds only the upsampled side state to the frozen LM head. A ViT task
//   head is new and trained, so here the side term is added to the backbone's own pooled
//   features, with `up` = 0 at init: step 0 is the linear probe, and the side network learns a
//   correction (at random init the side state alone would start the head from noise);
// - peft.side_blocks picks the ladders (LST's layer dropping); a skipped block passes h on.
// Registered as side_in.*, blocks.{i}.side.{down,block,gate}, side_out.{norm,up}: each part
// on the pipeline stage that holds the backbone layer it reads.
#include <algorithm>
#include <stdexcept>

#include "peft/method.h"

namespace shardtune {

namespace {

constexpr double kGateTemperature = 0.1;  // LST's gate_T

struct Ladder : SideLadder {
  Ladder(const ViTConfig& side, int64_t dim, const std::shared_ptr<const ops::Ops>& ops) {
    down = register_module("down", std::make_shared<DenseLinear>(dim, side.dim, true, ops));
    block = register_module("block", Block(side, ops));
    gate = register_parameter("gate", torch::zeros({1}));
  }
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& h) override {
    torch::Tensor d = down->forward(x);
    torch::Tensor mu = torch::sigmoid(cast_like(gate, d) / kGateTemperature);
    return block->forward(mu * h + (1 - mu) * d);
  }
  std::shared_ptr<DenseLinear> down;
  Block block{nullptr};
  torch::Tensor gate;  // alpha_i
};

struct SideIn : Op {
  SideIn(int64_t dim, int64_t width, const std::shared_ptr<const ops::Ops>& ops) {
    down = register_module("down", std::make_shared<DenseLinear>(dim, width, true, ops));
  }
  torch::Tensor forward(const torch::Tensor& x) override { return down->forward(x); }
  std::shared_ptr<DenseLinear> down;
};

struct SideOut : Op {
  SideOut(int64_t width, int64_t dim, const std::shared_ptr<const ops::Ops>& ops) {
    norm = register_module("norm", std::make_shared<LayerNormOp>(width, ops));
    up = register_module("up", std::make_shared<DenseLinear>(width, dim, true, ops));
  }
  torch::Tensor forward(const torch::Tensor& pooled_h) override { return up->forward(norm->forward(pooled_h)); }
  std::shared_ptr<LayerNormOp> norm;
  std::shared_ptr<DenseLinear> up;
};

void linear_init(DenseLinear& l) {  // torch.nn.Linear's
  kaiming_uniform_linear_(l.weight);
  torch::NoGradGuard g;
  l.bias.uniform_(-1.0 / std::sqrt(static_cast<double>(l.in_features)), 1.0 / std::sqrt(static_cast<double>(l.in_features)));
}

void timm_init(BlockImpl& b) {  // in the block's forward order, as the model's own blocks
  for (const auto* op : {&b.norm1, &b.attn->qkv, &b.attn->proj, &b.norm2, &b.mlp->fc1, &b.mlp->fc2}) init_layer(*op);
}

struct Lst : Method {
  ParamList inject(VisionTransformerImpl& model, const PeftConfig& cfg) const override {
    if (!cfg.targets.empty()) throw std::invalid_argument("peft.targets is not used by peft.method=lst (see peft.side_blocks)");
    const ViTConfig side = side_config(model.config, cfg);
    const std::set<int64_t> chosen = side_block_set(cfg, model.config.depth);
    ParamList owned;
    auto own = [&](torch::nn::Module& m) {
      for (auto& p : m.parameters()) owned.push_back(p);
    };
    model.side_width = side.dim;
    if (model.part.embed) {
      seed_peft_init("side_in");
      auto in = std::make_shared<SideIn>(model.config.dim, side.dim, model.ops);
      linear_init(*in->down);
      model.side_in = model.register_module("side_in", in);
      own(*in);
    }
    for (size_t i = 0; i < model.num_blocks(); ++i) {
      const int64_t index = model.block_index(i);
      if (!chosen.count(index)) continue;
      seed_peft_init("blocks." + std::to_string(index) + ".side");
      auto ladder = std::make_shared<Ladder>(side, model.config.dim, model.ops);
      linear_init(*ladder->down);
      timm_init(*ladder->block);
      Block b = model.block(i);
      b->side = b->register_module("side", ladder);
      own(*ladder);
    }
    if (model.part.head) {
      seed_peft_init("side_out");
      auto out = std::make_shared<SideOut>(side.dim, model.config.dim, model.ops);
      torch::NoGradGuard g;
      out->up->weight.zero_();
      out->up->bias.zero_();
      model.side_out = model.register_module("side_out", out);
      own(*out);
    }
    return owned;
  }
};

}  // namespace

void register_lst(MethodRegistry& r) { r.add("lst", std::make_unique<Lst>()); }

}  // namespace shardtune
