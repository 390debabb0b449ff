// What a forward pass is told (which paths are on, recomputation, loss scaling) and what it reports
// (named per-step statistics for the metrics log).
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "autograd/checkpoint.h"
#include "autograd/tensor.h"
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

  // Statistics made of device values: `fn` gets `values` copied to the host. With defer_stats (a
  // language model's forward sets it) the copies are queued now and `fn` runs in finish_stats, at
  // the forward's end: one wait for the device instead of one a statistic (each wait drains the
  // device's queue; about 70 of them doubled a toy step's time). Otherwise `fn` runs at once.
  using StatFn = std::function<void(const std::vector<Tensor>& host, ForwardContext& ctx)>;
  bool defer_stats = false;
  void stat_later(const std::vector<Tensor>& values, StatFn fn) {
    if (!recording()) return;
    if (!defer_stats) {
      std::vector<Tensor> host;
      for (const Tensor& v : values) host.push_back(v.detach().cpu());
      fn(host, *this);
      return;
    }
    PendingStat pending{{}, std::move(fn)};
    for (const Tensor& v : values) pending.copies.push_back(std::make_shared<PendingHostCopy>(v));
    pending_stats.push_back(std::move(pending));
  }
  // Runs the deferred statistics in the order they came.
  void finish_stats() {
    std::vector<PendingStat> todo;
    todo.swap(pending_stats);
    for (PendingStat& p : todo) {
      std::vector<Tensor> host;
      for (const auto& c : p.copies) host.push_back(c->host());
      p.fn(host, *this);
    }
  }
  struct PendingStat {
    std::vector<std::shared_ptr<PendingHostCopy>> copies;
    StatFn fn;
  };
  std::vector<PendingStat> pending_stats;
};

}  // namespace hydra::model
