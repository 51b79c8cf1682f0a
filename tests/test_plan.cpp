// `plan`: closed-form memory, communication and FLOPs per rank, and the mesh search.
#include <gtest/gtest.h>

#include <cmath>

#include "launch/plan.h"
#include "models/vit_config.h"

using namespace shardtune;

namespace {
PlanInput lora(const std::string& arch, int world) {
  PlanInput in;
  in.model = vit_preset(arch);
  in.peft.method = "lora";
  in.world = world;
  in.global_batch = 8;
  return in;
}
}  // namespace

TEST(Plan, ViTBaseLoraOnOneRank) {
  PlanInput in = lora("vit_base_patch16_224", 1);
  PlanResult r = plan_mesh(in, 1, 1);
  EXPECT_EQ(r.trainable_params, 294912 + 769000);
  EXPECT_DOUBLE_EQ(r.frozen_bytes, 4.0 * 86567656);  // every parameter in fp32 on one rank
  EXPECT_DOUBLE_EQ(r.peft_bytes, 16.0 * (294912 + 769000));
  EXPECT_EQ(r.dp_sync_bytes, 0);
  EXPECT_EQ(r.tp_allreduce_bytes, 0);
  EXPECT_EQ(r.bubble, 0);
  EXPECT_NEAR(r.flops_per_step / 1e9, 2 * 8 * 35.1, 2);  // 2 x forward for a frozen backbone
  // bf16 halves the frozen shard and the activations.
  in.precision = "bf16";
  PlanResult h = plan_mesh(in, 1, 1);
  EXPECT_DOUBLE_EQ(h.frozen_bytes, r.frozen_bytes / 2);
  EXPECT_DOUBLE_EQ(h.activation_bytes, r.activation_bytes / 2);
}

TEST(Plan, ShardingDividesTheFrozenWeightsAndAddsCommunication) {
  PlanInput in = lora("vit_large_patch16_224", 8);
  in.microbatches = 4;
  in.global_batch = 32;
  PlanResult one = plan_mesh(in, 1, 1), sharded = plan_mesh(in, 2, 2);
  EXPECT_EQ(sharded.dp, 2);
  EXPECT_LT(sharded.frozen_bytes, one.frozen_bytes / 3.5);  // ~1/4, norms and embeddings replicated
  EXPECT_GT(sharded.frozen_bytes, one.frozen_bytes / 4.5);
  EXPECT_GT(sharded.tp_allreduce_bytes, 0);
  EXPECT_GT(sharded.pp_send_bytes, 0);
  EXPECT_DOUBLE_EQ(sharded.bubble, 1.0 / 5.0);               // (p-1)/(m+p-1) = 1/5
  EXPECT_DOUBLE_EQ(sharded.dp_sync_bytes, 4.0 * sharded.trainable_params);
  in.schedule = "gpipe";                                     // GPipe keeps all m micro-batches
  EXPECT_GT(plan_mesh(in, 2, 2).activation_bytes, sharded.activation_bytes);
}

// lst: no backbone activations (the backbone runs without autograd), only the ladders' inputs
// and the narrow side blocks; FLOPs of one backbone forward plus the side network's forward
// and backward; the pipeline sends [x | h] forward and only dh back.
TEST(Plan, LstKeepsNoBackboneActivations) {
  PlanInput in = lora("vit_base_patch16_224", 1);
  PlanResult l = plan_mesh(in, 1, 1);
  in.peft.method = "lst";
  PlanResult s = plan_mesh(in, 1, 1);
  const double N = 197, D = 768, w = 96, Ms = 384, B = 8;
  EXPECT_DOUBLE_EQ(s.activation_bytes, 12 * B * 4 * (N * D + 13 * N * w + N * Ms + 1 * N * N));
  EXPECT_LT(s.activation_bytes, l.activation_bytes / 5);
  const double side_fwd = 2 * N * D * w * 13 + 12 * (8 * N * w * w + 4 * N * w * Ms + 4 * N * N * w);
  EXPECT_NEAR(s.flops_per_step, B * (35.1e9 + 3 * side_fwd), B * 1e9);
  EXPECT_LT(s.flops_per_step, 0.6 * l.flops_per_step);
  in.world = 2;
  PlanResult piped = plan_mesh(in, 1, 2);
  EXPECT_DOUBLE_EQ(piped.pp_send_bytes, B * N * ((D + w) + w) * 4);
  in.peft.side_blocks = "6-11";  // ladders on the second stage only
  EXPECT_DOUBLE_EQ(plan_mesh(in, 1, 2).activation_bytes, 6 * B * 4 * (N * D + 13 * N * w + N * Ms + N * N));
}

TEST(Plan, SearchFindsTheSmallestMeshThatFits) {
  PlanInput in = lora("vit_22b", 64);
  in.global_batch = 64;
  in.device_memory_bytes = 80e9;
  std::vector<std::string> why;
  PlanResult r = plan(in, &why);
  EXPECT_TRUE(r.fits);
  EXPECT_LE(r.total_bytes(), 80e9);
  EXPECT_GT(r.tp * r.pp, 1);  // 21.7B fp32 weights (87 GB) cannot sit on one 80 GB device
  ASSERT_FALSE(why.empty());
  EXPECT_NE(why.front().find("tp=1 pp=1"), std::string::npos);
  EXPECT_NE(why.back().find("fits"), std::string::npos);
  // Every smaller candidate that was tried did not fit.
  for (size_t i = 0; i + 1 < why.size(); ++i) EXPECT_EQ(why[i].find(": fits"), std::string::npos) << why[i];
}

TEST(Plan, ImpossibleRequestsSaySo) {
  PlanInput in = lora("vit_22b", 1);
  in.device_memory_bytes = 1e9;
  EXPECT_THROW(plan(in), std::invalid_argument);
  PlanInput bad = lora("vit_base_patch16_224", 4);
  try {
    plan_mesh(bad, 3, 1);
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("parallel.tp=3 x parallel.pp=1 = 3 does not divide the world size 4"),
              std::string::npos);
  }
}

TEST(Plan, ParsesDeviceMemory) {
  EXPECT_DOUBLE_EQ(parse_bytes("80GB"), 80e9);
  EXPECT_DOUBLE_EQ(parse_bytes("24GiB"), 24.0 * 1024 * 1024 * 1024);
  EXPECT_DOUBLE_EQ(parse_bytes("512MB"), 512e6);
  EXPECT_THROW(parse_bytes("lots"), std::invalid_argument);
  EXPECT_THROW(parse_bytes("80XB"), std::invalid_argument);
}
