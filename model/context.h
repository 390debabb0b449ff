// What a forward pass is told (which paths are on, recomputation, loss scaling) and what it reports
// (named per-step statistics for the metrics log).
#pragma once

#include <map>
#include <string>
#include <vector>

#include "autograd/checkpoint.h"
#include "parallel/grid.h"

namespace hydra::model {

// The curriculum switches paths on in turn (hydra.md section 8).
struct PathSwitches {
  bool ssm = true;
  bool sga = true;
  bool moe_routing = true;  // off: every expert on every token, averaged (a dense FFN)
  bool workspace = true;
  bool pkm = true;
};

struct ForwardContext {
  PathSwitches paths;
  bool recompute = false;  // checkpoint each block
  bool collect_stats = true;
  double aux_scale = 1.0;  // multiplies the MoE auxiliary losses (warm-up)
  int64_t pos0 = 0;        // position of the first token (sequence parallelism)
  std::map<std::string, double> stats;

  // Distributed runs (null: one process). A rank's losses are then its share of the global batch's
  // losses: they add up over the ranks to the loss one process computes on the whole batch.
  const parallel::ProcessGrid* grid = nullptr;
  // The cross-entropy's normaliser: non-ignored targets in the whole step, over every rank and
  // micro-batch (0: the mean over this forward's targets).
  double lm_tokens = 0;
  // Zero scalars from state chains along the ranks (parallel::send_to_next): the LM adds them to
  // the loss so their backward (which receives the state's gradient) runs.
  std::vector<Tensor> chain_tokens;

  bool sequence_parallel() const { return grid != nullptr && grid->shape().sp > 1; }
  // Sums host values over every rank, in place (nothing to do in one process).
  void world_sum(const parallel::HostSum& values) const {
    values.sum(grid != nullptr && grid->distributed() ? &grid->world() : nullptr);
  }

  // Statistics are recorded once per step: not again while a checkpoint recomputes.
  bool recording() const { return collect_stats && !is_recomputing(); }
  void stat(const std::string& key, double value) {
    if (recording()) stats[key] = value;
  }
};

}  // namespace hydra::model
