// What a forward pass is told (which paths are on, recomputation, loss scaling) and what it reports
// (named per-step statistics for the metrics log).
#pragma once

#include <map>
#include <string>

#include "autograd/checkpoint.h"

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
  bool recompute = false;     // checkpoint each block
  bool collect_stats = true;
  double aux_scale = 1.0;     // multiplies the MoE auxiliary losses (warm-up)
  int64_t pos0 = 0;           // position of the first token (sequence parallelism)
  std::map<std::string, double> stats;

  // Statistics are recorded once per step: not again while a checkpoint recomputes.
  bool recording() const { return collect_stats && !is_recomputing(); }
  void stat(const std::string& key, double value) {
    if (recording()) stats[key] = value;
  }
};

}  // namespace hydra::model
