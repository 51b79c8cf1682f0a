// Trainable-parameter counts of each PEFT method in closed form (torch-free), for `plan`
// on models too large to build. With the method's default targets; tested against the
// injected models' counts.
#pragma once

#include <cstdint>

#include "models/vit_config.h"
#include "peft/peft_config.h"

namespace shardtune {

// Parameters the method itself adds or unfreezes (the head excluded).
int64_t peft_param_count(const ViTConfig& model, const PeftConfig& peft);

// ... plus the head when it trains (every method but none, with peft.train_head).
int64_t trainable_param_count(const ViTConfig& model, const PeftConfig& peft);

}  // namespace shardtune
