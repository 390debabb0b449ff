// The staged curriculum (hydra.md section 8): a run is a sequence of stages, each with its steps,
// sequence length, batch, learning-rate schedule, enabled paths, frozen parameter groups, MoE loss
// scaling and data mix. A run without `curriculum` is one stage with everything on.
#pragma once

#include <string>
#include <vector>

#include "base/status.h"
#include "configs/hydra.pb.h"
#include "model/context.h"
#include "model/spec.h"

namespace hydra::trainer {

struct Stage {
  int64_t index = 0;
  std::string name;
  int64_t start = 0, steps = 0;  // global steps [start, start + steps)
  int64_t seq_len = 0, batch = 0;
  config::LrSchedule lr;
  model::PathSwitches paths;
  std::vector<std::string> freeze;
  double aux_scale = 1;
  int64_t aux_warmup = 0;
  config::SyntheticConfig data_mix;
};

// Parameter groups a stage can freeze, and whether `param` belongs to `group`.
const std::vector<std::string>& freeze_groups();
bool in_freeze_group(const std::string& param, const std::string& group);

// Fills what each curriculum stage inherits (lr from train.lr, data_mix from data.synthetic,
// seq_len and batch_size from train) into the stage itself, then resolves every default: the
// resolved config then says exactly what each stage runs with. Call before anything reads the
// config.
void resolve_run_config(config::RunConfig* cfg);

// Validates the training part of a resolved RunConfig against the model (errors name the file and
// the field) and lays out the stages.
Expected<std::vector<Stage>> resolve_stages(const config::RunConfig& cfg,
                                            const model::ModelSpec& spec,
                                            const std::string& source);
const Stage& stage_at(const std::vector<Stage>& stages, int64_t step);

}  // namespace hydra::trainer
