// FacT-TT (Jie & Deng): the updates of all block linears, cut into D x D pieces and stacked
// as one tensor [n, D, D] (qkv: 3 pieces by rows, proj: 1, fc1: M/D by rows, fc2: M/D by
// columns), factorised as dW_k = scale * U C_k V^T with U, V [D, r] shared and C [n, r, r].
// C = 0 at start, so step 0 equals the base model. Parameters live at fact_tt.{U,V,C};
// each wrapped linear holds the range of C it uses. Mergeable: W += dW.
#include <cmath>
#include <stdexcept>

#include "peft/method.h"

namespace shardtune {

namespace {

struct FactFactors : torch::nn::Module {
  FactFactors(int64_t dim, int64_t rank, int64_t pieces) {
    U = register_parameter("U", torch::empty({dim, rank}));
    V = register_parameter("V", torch::empty({dim, rank}));
    C = register_parameter("C", torch::zeros({pieces, rank, rank}));
    torch::NoGradGuard g;
    const double bound = std::sqrt(6.0 / static_cast<double>(dim + rank));  // xavier uniform
    U.uniform_(-bound, bound);
    V.uniform_(-bound, bound);
  }
  torch::Tensor U, V, C;
};

struct FactLinear : Op, Mergeable {
  FactLinear(std::shared_ptr<Op> base_op, std::shared_ptr<FactFactors> f, int64_t first, int64_t count,
             bool by_columns, double s)
      : factors(std::move(f)), first_piece(first), pieces(count), columns(by_columns), scale(s) {
    base = register_module("base_layer", std::move(base_op));
  }
  // dW [out, in] from pieces [first, first + count) of C.
  torch::Tensor delta() const {
    const auto& F = *factors;
    const int64_t D = F.U.size(0);
    torch::Tensor C = F.C.narrow(0, first_piece, pieces);                          // [m, r, r]
    torch::Tensor W = torch::matmul(torch::matmul(F.U, C), F.V.t());               // [m, D, D]
    W = columns ? W.permute({1, 0, 2}).reshape({D, pieces * D}) : W.reshape({pieces * D, D});
    return W * scale;
  }
  // Under tensor parallelism: this rank's rows or columns of dW, gradients summed over tp.
  torch::Tensor local_delta() const { return dense().out_rows(dense().in_cols(dense().region(delta()), 1)); }
  torch::Tensor forward(const torch::Tensor& x) override {
    if (merged) return base->forward(x);
    torch::Tensor xe = dense().enter(x);
    return dense().leave(dense().local(xe) + torch::linear(xe, cast_like(local_delta(), xe)));
  }
  DenseLinear& dense() const { return static_cast<DenseLinear&>(*base); }
  void merge() override { dense().weight.add_(local_delta().to(dense().weight.scalar_type())); }
  void unmerge() override { dense().weight.sub_(local_delta().to(dense().weight.scalar_type())); }

  std::shared_ptr<FactFactors> factors;  // shared, registered once at the model root
  std::shared_ptr<Op> base;
  int64_t first_piece, pieces;
  bool columns;
  double scale;
};

struct FactTT : Method {
  bool mergeable() const override { return true; }
  ParamList inject(VisionTransformerImpl& model, const PeftConfig& cfg) const override {
    if (cfg.rank <= 0) throw std::invalid_argument("peft.rank=" + std::to_string(cfg.rank) + " must be positive");
    const int64_t D = model.config.dim;
    if (model.part.first_block != 0 || model.part.end_block != model.config.depth)
      throw std::invalid_argument("peft.method=fact_tt shares U, V and C across all blocks, so it needs every block on one "
                                  "stage: use parallel.pp=1");
    seed_peft_init("fact_tt");
    auto targets = target_slots(model, cfg, "re:.*", {Slot::Kind::Linear});
    struct Plan {
      Slot slot;
      int64_t pieces;
      bool columns;
    };
    std::vector<Plan> plans;
    int64_t total = 0;
    for (const Slot& s : targets) {
      auto* d = dynamic_cast<DenseLinear*>(&s.get());
      if (!d) throw std::logic_error("FacT-TT wraps a plain Linear");
      const int64_t out = d->out_features, in = d->in_features;
      if (out % D || in % D || (out != D && in != D))
        throw std::invalid_argument("peft.method=fact_tt: " + s.path + " weight [" + std::to_string(out) + ", " +
                                    std::to_string(in) + "] is not a stack of " + std::to_string(D) + "x" +
                                    std::to_string(D) + " pieces (model.mlp_dim must be a multiple of model.dim)");
      bool columns = in != D;
      int64_t pieces = columns ? in / D : out / D;
      plans.push_back({s, pieces, columns});
      total += pieces;
    }
    auto factors = model.register_module("fact_tt", std::make_shared<FactFactors>(D, cfg.rank, total));
    int64_t first = 0;
    for (const auto& p : plans) {
      p.slot.replace(std::make_shared<FactLinear>(*p.slot.member, factors, first, p.pieces, p.columns, cfg.scale_or(1.0)));
      first += p.pieces;
    }
    return {factors->U, factors->V, factors->C};
  }
};

}  // namespace

void register_fact_tt(MethodRegistry& r) { r.add("fact_tt", std::make_unique<FactTT>()); }

}  // namespace shardtune
