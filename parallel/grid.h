// The process grid world = dp x ep x sp and its sub-communicators. A world rank is
//   rank = (dp_rank * ep + ep_rank) * sp + sp_rank
// so the ranks of a sequence-parallel group are adjacent (they exchange the most, every layer).
//   sp group:      same (dp, ep): the shards of the same sequences
//   ep group:      same (dp, sp): experts are split over it; chunks travel in its all-to-all
//   expert group:  same ep rank: the replicas of one expert shard (its gradients are summed there)
//   world:         dense parameters' gradients and global statistics
// Data: the dp x ep "data ranks" (same sp rank) each draw their own part of the global batch.
#pragma once

#include <memory>
#include <string>

#include "base/status.h"
#include "parallel/communicator.h"

namespace hydra::parallel {

struct GridShape {
  int64_t dp = 1, ep = 1, sp = 1;
  int64_t size() const { return dp * ep * sp; }
  std::string str() const;  // "dp=2 ep=1 sp=2"
};

class ProcessGrid {
 public:
  // Splits `world` into the groups; fails (same message on every rank) when dp * ep * sp is not the
  // world size. `source` names the config in messages.
  static Expected<std::unique_ptr<ProcessGrid>> create(std::unique_ptr<Communicator> world,
                                                       const GridShape& shape,
                                                       const std::string& source);
  // One process, no parallelism (every group is a SelfCommunicator).
  static std::unique_ptr<ProcessGrid> single(Device device = Device::cpu());

  const GridShape& shape() const { return shape_; }
  int64_t dp_rank() const { return dp_rank_; }
  int64_t ep_rank() const { return ep_rank_; }
  int64_t sp_rank() const { return sp_rank_; }
  int64_t data_rank() const { return dp_rank_ * shape_.ep + ep_rank_; }
  int64_t data_ranks() const { return shape_.dp * shape_.ep; }
  bool distributed() const { return shape_.size() > 1; }

  Communicator& world() const { return *world_; }
  Communicator& sp() const { return *sp_; }
  Communicator& ep() const { return *ep_; }
  Communicator& expert_replicas() const { return *expert_; }

 private:
  ProcessGrid() = default;
  GridShape shape_;
  int64_t dp_rank_ = 0, ep_rank_ = 0, sp_rank_ = 0;
  std::unique_ptr<Communicator> world_, sp_, ep_, expert_;
};

}  // namespace hydra::parallel
