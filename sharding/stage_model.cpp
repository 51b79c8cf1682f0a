#include "sharding/stage_model.h"

#include "common/log.h"
#include "peft/adapter_io.h"
#include "sharding/tp.h"

namespace shardtune {

namespace {

// Which stages hold a trainable parameter, from every stage's own answer.
StageRole role_of(const PeftState& peft, const Mesh& mesh) {
  StageRole role;
  role.stage = mesh.pp_rank();
  role.stages = mesh.dims.pp;
  torch::Tensor mine = torch::tensor({peft.trainable.empty() ? int64_t{0} : int64_t{1}}, torch::kInt64);
  torch::Tensor all = torch::zeros({role.stages}, torch::kInt64);
  mesh.pp->allgather(all, mine)->wait();
  const auto* trains = all.data_ptr<int64_t>();
  role.backward = role.input_grad = false;
  for (int s = 0; s < role.stage; ++s) role.input_grad = role.input_grad || trains[s];
  role.backward = role.input_grad || trains[role.stage];
  return role;
}

}  // namespace

StageModel build_stage_model(const ModelSpec& spec, const Mesh& mesh) {
  StageModel out;
  const StagePart part = StagePart::of(spec.model, mesh.pp_rank(), mesh.dims.pp);
  const bool from_checkpoint = !spec.checkpoint.empty();
  torch::manual_seed(spec.seed);
  out.model = VisionTransformer(spec.model, part, /*init=*/!from_checkpoint, spec.ops);
  if (mesh.dims.tp > 1) out.shards = parallelize(*out.model, make_tensor_parallel(mesh.tp), /*keep_values=*/!from_checkpoint);
  const bool bf16 = spec.precision == "bf16";
  if (from_checkpoint && bf16) {  // load straight into bf16: the fp32 tensors are never materialised
    torch::NoGradGuard no_grad;
    for (auto& p : out.model->parameters()) p.set_data(torch::empty(p.sizes(), p.options().dtype(torch::kBFloat16)));
  }
  if (from_checkpoint) {
    CheckpointReader reader(spec.checkpoint);
    KeyFilter other_stages = keys_of_other_stages(part);
    KeyFilter skip = spec.load_head ? other_stages : [other_stages](const std::string& k) {
      return other_stages(k) || k.rfind("head.", 0) == 0;
    };
    load_state(*out.model, reader, out.shards, skip);
    out.checkpoint_bytes = reader.bytes_read();
    if (!spec.load_head && out.model->head) {  // a new task's head: timm's init, the same on every mesh
      torch::manual_seed(spec.seed + 2);
      torch::NoGradGuard no_grad;
      auto& head = static_cast<DenseLinear&>(*out.model->head);
      for (auto* t : {&head.weight, &head.bias}) t->set_data(torch::empty(t->sizes(), t->options().dtype(torch::kFloat32)));
      trunc_normal_(head.weight, 0.02);
      head.bias.zero_();
    }
    spdlog::debug("stage {}: read {} bytes of {}", mesh.pp_rank(), out.checkpoint_bytes, spec.checkpoint);
  }
  torch::manual_seed(spec.seed + 1);  // PEFT init: per module path, independent of the mesh
  out.peft = apply_peft(*out.model, spec.peft);
  if (!spec.adapter_dir.empty())
    load_adapter_weights(spec.adapter_dir, out.peft, keys_of_other_stages(part, kAdapterKeyPrefix));
  if (bf16) {
    torch::NoGradGuard no_grad;
    for (auto& [_, t] : out.peft.trainable)  // trainable backbone tensors (bitfit, head) keep fp32 masters
      if (t.scalar_type() != torch::kFloat32) t.set_data(t.data().to(torch::kFloat32));
    cast_frozen(*out.model, torch::kBFloat16);
  }
  out.role = role_of(out.peft, mesh);
  out.role.grad_tail = out.model->side_width;  // side tuning: only the side stream's gradient travels back
  return out;
}

using Named = std::vector<std::pair<std::string, torch::Tensor>>;

Named gather_named(const Named& mine, const Mesh& mesh) {
  Named out;
  if (mesh.dp_rank() != 0 || mesh.tp_rank() != 0) return out;  // replicas of what rank 0's pp group holds
  ProcessGroup& pp = *mesh.pp;
  if (mesh.pp_rank() != 0) {
    std::vector<torch::Tensor> keep;
    std::vector<std::shared_ptr<Work>> works;
    auto send = [&](const torch::Tensor& t) {
      for (auto& w : send_tensor(pp, t, 0, keep)) works.push_back(w);
    };
    send(torch::tensor({static_cast<int64_t>(mine.size())}, torch::kInt64));
    for (const auto& [name, t] : mine) {
      send(torch::from_blob(const_cast<char*>(name.data()), {static_cast<int64_t>(name.size())}, torch::kUInt8).clone());
      send(t.detach());
    }
    for (auto& w : works) w->wait();
    return out;
  }
  for (const auto& [name, t] : mine) out.emplace_back(name, t.detach());
  for (int s = 1; s < mesh.dims.pp; ++s) {
    const int64_t n = recv_tensor(pp, s).item<int64_t>();
    for (int64_t i = 0; i < n; ++i) {
      torch::Tensor name = recv_tensor(pp, s);
      out.emplace_back(std::string(static_cast<const char*>(name.data_ptr()), static_cast<size_t>(name.numel())),
                       recv_tensor(pp, s));
    }
  }
  return out;
}

std::vector<std::pair<std::string, torch::Tensor>> gather_trainable(const StageModel& m, const Mesh& mesh) {
  return gather_named(m.peft.trainable, mesh);
}

std::vector<std::pair<std::string, torch::Tensor>> gather_backbone(const StageModel& m, const Mesh& mesh) {
  Named whole;
  const int64_t tp = mesh.dims.tp;
  for (auto& [name, t] : backbone_state(*m.model.ptr(), m.peft)) {
    auto it = m.shards.find(name);
    if (it == m.shards.end()) {
      whole.emplace_back(name, t.detach());
      continue;
    }
    const TensorShard& s = it->second;  // every rank holds as many indices (even split)
    torch::Tensor mine = t.detach().contiguous();
    torch::Tensor all = torch::empty({tp * mine.numel()}, mine.options());
    mesh.tp->allgather(all, mine)->wait();
    torch::Tensor index = torch::tensor(s.index, torch::kInt64);
    torch::Tensor indices = torch::empty({tp * index.numel()}, torch::kInt64);
    mesh.tp->allgather(indices, index)->wait();
    std::vector<int64_t> part_shape = mine.sizes().vec();
    part_shape.insert(part_shape.begin(), tp);
    torch::Tensor parts = all.view(part_shape);
    torch::Tensor full = torch::empty(s.full_shape, mine.options());
    for (int64_t r = 0; r < tp; ++r) full.index_copy_(s.dim, indices.narrow(0, r * index.numel(), index.numel()), parts[r]);
    whole.emplace_back(name, full);
  }
  return gather_named(whole, mesh);
}

}  // namespace shardtune
