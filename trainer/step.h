// One training step's forward and backward over micro-batches, as the trainer runs it and as the
// multi-rank tests check it: on a grid each rank passes its part of the global batch (its sequences
// and its sequence shard); the losses returned are those of the whole global batch, and after it
// every gradient is the gradient of that loss (reduced over the ranks when a reducer is given).
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "data/loader.h"
#include "model/lm.h"
#include "parallel/reducer.h"

namespace hydra::trainer {

struct StepSettings {
  model::PathSwitches paths;
  bool recompute = false;
  double aux_scale = 1;  // the stage's scale times its warm-up factor
  int64_t grad_accum = 1;
  bool collect_stats = true;  // the model's statistics (last micro-batch) into StepLosses::stats
  Device device = Device::cpu();
};

struct StepLosses {
  double lm = 0, total = 0;
  model::AuxLosses aux;
  std::map<std::string, double> stats;  // the last micro-batch's, this rank's (collect_stats)
  double grad_norm = 0;                 // sqrt of QueuedLosses::grad_sum_squares, when given
};

StepLosses forward_backward(model::LanguageModel& model, const parallel::ProcessGrid& grid,
                            parallel::GradientReducer* reducer, const data::Batch& local,
                            const StepSettings& s);

// The same step with its losses left on the device: the trainer queues the optimizer's update
// before it reads them, so that the GPU is not idle while the host launches the update.
struct QueuedLosses {
  std::vector<Tensor> parts;  // per micro-batch: f64 [2 + kNumAuxLosses]: lm, total, the aux losses
  std::map<std::string, double> stats;  // as StepLosses::stats
  Tensor grad_sum_squares;              // optional (f64 [1], the trainer's): read with the losses
  // Queues the copy of the values to the host behind the work queued so far (after
  // grad_sum_squares is set): read() then waits for this step alone, not for work queued after it
  // (the trainer queues the next step first). Without it read() copies them when called.
  void start_read();
  // The values (one wait for the device), summed over the micro-batches and the ranks' shares.
  StepLosses read(const parallel::ProcessGrid& grid) const;

 private:
  Tensor values() const;  // parts and grad_sum_squares in one f64 tensor, on the device
  std::shared_ptr<PendingHostCopy> copy_;  // start_read's
};
QueuedLosses forward_backward_queued(model::LanguageModel& model, const parallel::ProcessGrid& grid,
                                     parallel::GradientReducer* reducer, const data::Batch& local,
                                     const StepSettings& s);

}  // namespace hydra::trainer
