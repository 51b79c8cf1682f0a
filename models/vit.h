// The Vision Transformer, defined once, unsharded, with timm's module and parameter names
// (patch_embed.proj, cls_token, pos_embed, blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,
// mlp.fc1,mlp.fc2,ls1.gamma,ls2.gamma}, norm, fc_norm, head), so a timm state_dict loads
// unchanged. It knows nothing of parallelism or PEFT: both replace its Linear layers
// afterwards through slots (see Op and Slot). How each operator runs (which GEMM kernel, which
// bf16 kernels, which device's ops) is the `ops::Ops` object handed to the model at construction
// and passed to every layer it builds (ops/ops.h); this file holds the model alone.
#pragma once

#include <torch/torch.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "models/vit_config.h"
#include "ops/ops.h"

namespace shardtune {

// --- Tensor-parallel regions ----------------------------------------------------------
// The two conjugate operations of a tensor-parallel region (Megatron's f and g), provided
// by sharding/ when a layer is sharded; the model only calls them.
struct TensorParallel {
  virtual ~TensorParallel() = default;
  // f: identity forward, gradient summed over the tp group backward. Applied to what
  // enters a region replicated (activations, and parameters used inside the region).
  virtual torch::Tensor enter(const torch::Tensor& x) const = 0;
  // g: sum over the tp group forward, identity backward. Applied to partial sums leaving it.
  virtual torch::Tensor reduce(const torch::Tensor& x) const = 0;
  int rank = 0, size = 1;
};

// --- Replaceable layers -------------------------------------------------------------
// Every projection and LayerNorm is called through `Op`, so that tensor parallelism
// (column/row-parallel linears) and PEFT (LoRA/SSF wrapping the base layer, adapters, ...)
// can swap implementations after construction without the model knowing (see Slot).
struct Op : torch::nn::Module {
  virtual torch::Tensor forward(const torch::Tensor& x) = 0;
  // A parameter acting per output channel on forward()'s output (dim 0 = channels), as
  // this rank uses it: itself, or under tensor parallelism the channels this rank's
  // output holds, with gradients summed over the tp group.
  virtual torch::Tensor output_param(const torch::Tensor& p) const { return p; }
};

// y = x W^T + b: weight [out, in], optional bias [out].
//
// Tensor parallelism (set by sharding::parallelize, none by default) keeps the full bias
// but only a shard of the weight: split Rows (column-parallel: this rank's output rows,
// `shard_index`, input replicated) or Cols (row-parallel: this rank's input columns,
// partial outputs summed, then the bias). forward(x) = leave(local(enter(x))); a wrapper
// adding a term to the output adds it between local and leave, i.e. before the sum.
struct DenseLinear : Op {
  enum class Split { None, Rows, Cols };
  DenseLinear(int64_t in_features, int64_t out_features, bool with_bias,
              std::shared_ptr<const ops::Ops> ops = ops::default_ops());
  torch::Tensor forward(const torch::Tensor& x) override { return leave(local(enter(x))); }
  torch::Tensor output_param(const torch::Tensor& p) const override;

  torch::Tensor enter(const torch::Tensor& x) const;  // f for Rows
  torch::Tensor local(const torch::Tensor& x) const;  // this rank's GEMM (+ its bias rows for Rows)
  torch::Tensor leave(const torch::Tensor& y) const;  // g + bias for Cols
  // A parameter used inside the region: f (its gradient summed over tp); itself when not split.
  torch::Tensor region(const torch::Tensor& p) const;
  // Rows of `t` (dim 0 = full output rows offset .. offset + t.size(0)) that this rank's
  // output holds (Rows); `t` itself otherwise.
  torch::Tensor out_rows(const torch::Tensor& t, int64_t offset = 0) const;
  // This rank's input columns of `t` along `dim` (Cols); `t` itself otherwise.
  torch::Tensor in_cols(const torch::Tensor& t, int64_t dim) const;
  // Where full output rows [offset, offset + n) sit in this rank's output: (start, count).
  std::pair<int64_t, int64_t> local_range(int64_t offset, int64_t n) const;
  int64_t full_out() const { return out_features; }

  torch::Tensor weight;
  torch::Tensor bias;  // undefined without bias; never sharded
  int64_t in_features, out_features;  // of the whole layer
  Split split = Split::None;
  torch::Tensor shard_index;  // int64: full rows (Rows) or columns (Cols) held, ascending
  std::shared_ptr<TensorParallel> tp;
  std::shared_ptr<const ops::Ops> ops;
};

// LayerNorm over the last dim, eps 1e-6 (timm's ViT): weight [D], bias [D]. Inside a
// tensor-parallel region (qk_norm under tp) `tp` is set and its parameters enter through f.
struct LayerNormOp : Op {
  explicit LayerNormOp(int64_t width, std::shared_ptr<const ops::Ops> ops = ops::default_ops());
  torch::Tensor forward(const torch::Tensor& x) override;
  torch::Tensor output_param(const torch::Tensor& p) const override { return tp ? tp->enter(p) : p; }

  int64_t width;
  torch::Tensor weight, bias;
  std::shared_ptr<TensorParallel> tp;
  std::shared_ptr<const ops::Ops> ops;
};

// Extends attention keys and values (prefix tuning): k, v [B, H, N, hd] -> [B, H, L+N, hd].
struct KVExtension : torch::nn::Module {
  virtual std::pair<torch::Tensor, torch::Tensor> extend(const torch::Tensor& k, const torch::Tensor& v) = 0;
};

// --- Attention ------------------------------------------------------------------------
// x: [B, N, D] -> qkv: [B, N, 3D] with rows q, k, v (heads contiguous inside each)
// -> softmax(q k^T * head_dim^-0.5) v -> proj. With `queries` > 0 only the first `queries`
// tokens attend (over all N keys and values): output [B, queries, D].
struct AttentionImpl : torch::nn::Module {
  AttentionImpl(const ViTConfig& c, std::shared_ptr<const ops::Ops> ops);
  torch::Tensor forward(const torch::Tensor& x, int64_t queries = 0);

  // This rank's heads, from head `first_head` (tensor parallelism: heads / tp of them).
  // A per-head parameter p (heads along `dim`) as this rank uses it.
  torch::Tensor local_heads(const torch::Tensor& p, int64_t dim) const {
    return tp ? tp->enter(p).narrow(dim, first_head, heads) : p;
  }

  int64_t heads;  // local heads: heads / tp under tensor parallelism
  int64_t first_head = 0;
  std::shared_ptr<TensorParallel> tp;  // set when the heads are sharded
  double scale;
  std::shared_ptr<Op> qkv, proj;
  std::shared_ptr<Op> q_norm, k_norm;  // only with qk_norm
  std::shared_ptr<KVExtension> kv_extension;  // optional, e.g. prefix tuning
  std::shared_ptr<const ops::Ops> ops;
};
TORCH_MODULE(Attention);

// --- MLP ----------------------------------------------------------------------------
// fc1 [M, D] -> exact (erf) GELU -> fc2 [D, M].
struct MlpImpl : torch::nn::Module {
  MlpImpl(const ViTConfig& c, std::shared_ptr<const ops::Ops> ops);
  torch::Tensor forward(const torch::Tensor& x);

  std::shared_ptr<Op> fc1, fc2;
  std::shared_ptr<const ops::Ops> ops;
};
TORCH_MODULE(Mlp);

// --- Side stream (side tuning) ---------------------------------------------------------
// A narrow trainable stream h [B, T, w] beside the frozen token stream x [B, T, D] (LST,
// peft/lst/). With one, the model runs its own layers without autograd and calls the side at
// each block that has one; between pipeline stages x and h travel as one tensor
// [B, T, D + w], h last, and only h's gradient travels back. The model's `side_in` starts the
// stream from the embedding's tokens (first stage) and `side_out` turns the pooled stream
// into a term added to the backbone's pooled features (last stage).
struct SideLadder : torch::nn::Module {
  // x: the block's output tokens (a constant), h: the stream so far -> the new stream.
  virtual torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& h) = 0;
};

// --- Block --------------------------------------------------------------------------
// Pre-norm residual block: x = pre(x); h = x + ls1(attn(norm1(x)));
// out = h + ls2(mlp(norm2(h)) + mlp_side(h)). `pre` and `mlp_side` are optional extension
// points (VPT prompts, AdaptFormer) that PEFT fills in. With `out_tokens` > 0 only the first
// `out_tokens` tokens are computed past attention's keys and values (everything after
// attention acts per token): the model's last block when only the cls token is read.
struct BlockImpl : torch::nn::Module {
  BlockImpl(const ViTConfig& c, std::shared_ptr<const ops::Ops> ops);
  torch::Tensor forward(const torch::Tensor& x, int64_t out_tokens = 0);

  std::shared_ptr<Op> norm1, norm2;
  Attention attn{nullptr};
  Mlp mlp{nullptr};
  torch::Tensor ls1_gamma, ls2_gamma;  // [D], registered as ls1.gamma / ls2.gamma with layer_scale
  std::shared_ptr<Op> pre;       // tokens -> tokens before the block
  std::shared_ptr<Op> mlp_side;  // a branch beside the MLP, fed the block's residual stream
  std::shared_ptr<SideLadder> side;  // side tuning: reads this block's output (see SideLadder)
  std::shared_ptr<const ops::Ops> ops;
};
TORCH_MODULE(Block);

// --- Patch embedding ---------------------------------------------------------------------
// A conv with kernel = stride = patch: [B, C, H, W] -> [B, D, H/P, W/P] -> tokens [B, N, D].
struct PatchEmbedImpl : torch::nn::Module {
  PatchEmbedImpl(const ViTConfig& c, std::shared_ptr<const ops::Ops> ops);
  torch::Tensor forward(const torch::Tensor& images);

  int64_t patch;
  torch::nn::Conv2d proj{nullptr};
  std::shared_ptr<const ops::Ops> ops;
};
TORCH_MODULE(PatchEmbed);

// --- VisionTransformer ------------------------------------------------------------------
// The part of the model one pipeline stage builds: blocks [first_block, end_block), the
// patch embedding on the first stage, the final norm and head on the last.
struct StagePart {
  int64_t first_block = 0, end_block = 0;
  bool embed = true, head = true;
  static StagePart whole(const ViTConfig& c) { return {0, c.depth, true, true}; }
  // Stage `stage` of `stages`: consecutive blocks, balanced (sizes differ by at most one).
  static StagePart of(const ViTConfig& c, int stage, int stages);
};

struct VisionTransformerImpl : torch::nn::Module {
  // `init` false leaves the weights uninitialised (untouched memory) for a checkpoint to fill.
  explicit VisionTransformerImpl(const ViTConfig& c) : VisionTransformerImpl(c, StagePart::whole(c)) {}
  VisionTransformerImpl(const ViTConfig& c, const StagePart& part, bool init = true,
                        std::shared_ptr<const ops::Ops> ops = ops::default_ops());

  // images [B, C, H, W] (or, without the embedding, tokens [B, T, D]) -> logits
  // [B, num_classes] (pooled features [B, D] when num_classes = 0; tokens without the head).
  // With cls-token pooling the last block computes the cls token only (exact: nothing else
  // reaches the output), which skips ~10/12 of that block's forward and backward GEMMs.
  // With a side stream (side_width > 0) tokens are [B, T, D + side_width] between stages, and
  // the backbone's layers run without autograd (see side_forward).
  torch::Tensor forward(const torch::Tensor& input);

  // The three parts of forward, for pipeline stages:
  torch::Tensor embed(const torch::Tensor& images);  // -> tokens [B, N+1, D], cls first
  torch::Tensor head_forward(const torch::Tensor& tokens);  // tokens [B, N+1, D] -> logits

  // timm's default init ('' mode): trunc_normal(0.02) Linear weights and pos_embed,
  // normal(1e-6) cls_token, zero biases, LayerNorm ones/zeros, conv PyTorch default.
  // Deterministic given torch's global seed.
  void init_weights();

  ViTConfig config;
  StagePart part;
  std::shared_ptr<const ops::Ops> ops;          // how every layer runs (ops/ops.h)
  PatchEmbed patch_embed{nullptr};              // first stage only, as cls_token and pos_embed
  torch::Tensor cls_token;                      // [1, 1, D]
  torch::Tensor pos_embed;                      // [1, N+1, D]
  std::shared_ptr<torch::nn::Module> blocks;    // children named by their global index
  std::shared_ptr<Op> norm;     // global_pool = token
  std::shared_ptr<Op> fc_norm;  // global_pool = avg
  std::shared_ptr<Op> head;     // absent when num_classes = 0
  int64_t num_prefix_tokens = 1;  // cls (+ prompts a PEFT method inserts); avg pooling skips them
  int64_t side_width = 0;         // side tuning: the stream's width w (0: no side stream)
  std::shared_ptr<Op> side_in;    // side tuning, first stage: tokens [B, T, D] -> h [B, T, w]
  std::shared_ptr<Op> side_out;   // side tuning, last stage: pooled h [B, w] -> [B, D]

  std::vector<Block> stage_blocks;              // this stage's blocks, in order

  // forward with a side stream: the frozen layers under NoGradGuard (no graph, nothing saved),
  // every block whole where a ladder reads it (the last block computes the cls token alone
  // only when it has no ladder), h starting
  // as side_in(tokens) on the first stage; the head reads pool(norm(x)) + side_out(pool(h)).
  torch::Tensor side_forward(const torch::Tensor& input);
  // The pooled tokens [B, T, C] -> [B, C] as the head pools them (cls token or patch mean).
  torch::Tensor pool(const torch::Tensor& tokens) const;
  // What the head reads: the pooled tokens [B, T, D] after the final norm -> [B, D].
  torch::Tensor features(const torch::Tensor& tokens);
  // Whether this stage's last block computes the cls token alone (exact: nothing else reaches
  // a cls-pooled head), i.e. on the last stage with token pooling and no ladder reading it.
  bool last_block_cls_only() const;

  // The model split at its frozen part (train.cache_backbone; a whole model whose trainable
  // parameters are the head's, and with a side stream the side network's):
  //   frozen_outputs(images)  what the trainable part reads, without autograd: the pooled,
  //                           normed features [B, D]; with a side stream first the embedding's
  //                           tokens and each ladder block's output [B, T, D], in block order;
  //   from_frozen_outputs     the logits from them: forward(images), op for op.
  std::vector<torch::Tensor> frozen_outputs(const torch::Tensor& images);
  torch::Tensor from_frozen_outputs(const std::vector<torch::Tensor>& outputs);
  std::vector<std::vector<int64_t>> frozen_output_shapes() const;  // per image, without the batch dim

  size_t num_blocks() const { return stage_blocks.size(); }
  Block block(size_t i) const { return stage_blocks[i]; }  // i-th block of this stage
  int64_t block_index(size_t i) const { return part.first_block + static_cast<int64_t>(i); }  // global
};
TORCH_MODULE(VisionTransformer);

// A replaceable layer: its module path and the member that holds it. Replacing through a
// slot keeps the registered name, so parameter paths stay timm's.
struct Slot {
  enum class Kind { Linear, Norm };
  std::string path;              // "blocks.0.attn.qkv", "norm", "head"
  Kind kind;
  torch::nn::Module* owner;      // the module that registered it
  std::string name;              // its name inside owner
  std::shared_ptr<Op>* member;   // the owner's field

  Op& get() const { return **member; }
  void replace(std::shared_ptr<Op> op) const;
};

// Gives every layer of `model` (PEFT's included) the operators `ops`: for A/B comparisons of
// operator choices on one set of weights (bench/step_ab.cpp, tests). A run's model gets its
// ops at construction.
void set_ops(torch::nn::Module& model, const std::shared_ptr<const ops::Ops>& ops);

// Every Linear (patch embedding excluded) and LayerNorm of the model, in forward order.
std::vector<Slot> slots(VisionTransformerImpl& model);

// `t` in the dtype of `like` (undefined stays undefined): how every layer uses its
// parameters, so bf16 compute works with fp32 trainable parameters.
inline torch::Tensor cast_like(const torch::Tensor& t, const torch::Tensor& like) {
  return t.defined() ? t.to(like.scalar_type()) : t;
}

// Seeds torch's global generator from `seed` and a module path (FNV-1a): what a tensor at
// that path draws then depends on nothing else (not on which stage builds it, nor on the
// order things were built in).
void seed_for_path(uint64_t seed, const std::string& path);

// timm's init of a plain layer: a DenseLinear trunc_normal(0.02) with zero bias, a LayerNorm
// ones and zeros; any other (swapped-in) layer is left as it is.
void init_layer(const std::shared_ptr<Op>& op);

// Fills `t` in place from N(0, std) truncated to [-2 std, 2 std] (PyTorch's algorithm).
void trunc_normal_(torch::Tensor t, double std);

}  // namespace shardtune
