// Learning-rate schedules: linear warmup, then cosine / linear decay to min_lr_ratio * lr, or
// constant.
#pragma once

#include "configs/hydra.pb.h"

namespace hydra::trainer {

// The rate at `step` (0-based) of a schedule that spans `total` steps.
double scheduled_lr(const config::LrSchedule& s, int64_t step, int64_t total);

}  // namespace hydra::trainer
