// Checkpoints (single process; sharded layouts come with parallelism): a directory per step
//   DIR/checkpoints/step-00000020/rank-00000.h5   every parameter, optimizer state and buffer by name
//   DIR/checkpoints/step-00000020/manifest.pb     CheckpointManifest, written last
// written under a .tmp name and renamed into place, so a checkpoint without a manifest never appears.
// Loading checks the model config, every tensor's shape, dtype and CRC32C.
#pragma once

#include <string>
#include <vector>

#include "autograd/random.h"
#include "configs/hydra.pb.h"
#include "model/lm.h"
#include "trainer/optimizer.h"

namespace hydra::trainer {

struct TrainState {
  int64_t step = 0;  // steps completed
  int64_t stage = 0;
  GeneratorState rng;
  uint64_t data_seed = 0;
  double tokens_seen = 0, elapsed_s = 0;
};

class CheckpointManager {
 public:
  CheckpointManager(std::string run_dir, int64_t keep_last);
  std::string checkpoint_dir(int64_t step) const;

  // Writes the checkpoint of state.step; then keeps the newest keep_last. Returns its directory.
  Expected<std::string> save(const TrainState& state, const config::RunConfig& resolved,
                             const model::LanguageModel& model, const AdamW& optimizer) const;
  // Newest complete checkpoint (with a manifest) under run_dir, or not_found.
  Expected<std::string> latest() const;
  static Expected<config::CheckpointManifest> read_manifest(const std::string& dir);
  // Restores model, optimizer and state from `dir`, after checking it matches `resolved`'s model.
  static Status load(const std::string& dir, const config::RunConfig& resolved, model::LanguageModel& model,
                     AdamW& optimizer, TrainState* state);

 private:
  std::string root_;
  int64_t keep_last_;
};

}  // namespace hydra::trainer
