// Data-parallel gradient reduction, overlapped with the backward. Parameters are put in buckets
// (about bucket_mb each, in the reverse of their registration order: roughly the order their
// gradients become ready); a parameter's gradient-ready hook marks it, and a bucket whose
// parameters are all ready is flattened and its all-reduce started at once, while the backward goes
// on. Buckets start in bucket order on every rank (a later bucket that is ready early waits for the
// earlier ones), so the ranks always issue the same collectives in the same order. finish() starts
// what is left (a parameter that got no gradient this step counts as zero), waits, and puts the
// sums back into .grad.
//
// Each parameter names the group its gradient is summed over (dense: the world; an expert shard:
// its replicas). Gradients are summed, not averaged: the loss is already normalised by the global
// count. Row-sparse gradients (PKM values) are not bucketed: finish() all-gathers their rows and
// values and merges them, so only touched rows travel.
//
// ZeRO-1 (shard = true): each bucket, padded to a multiple of its group's size, is split into one
// equal slice per rank; the bucket is reduce-scattered instead of all-reduced, so each rank
// receives the summed gradient of its slice only (half an all-reduce's traffic). A parameter's part
// on this rank is shard(i): the flat range [lo, hi) of the (local) parameter and its reduced
// gradient; the optimizer updates that range and all_gather_params() then gives every rank the
// whole updated parameters (the other half of the all-reduce's traffic). The local full gradients
// are dropped in finish(). Row-sparse parameters are split by rows instead ([lo, hi) covers whole
// rows): their merged gradient is the same on every rank, each rank updates the touched rows it
// owns, and all_gather_params() shares the touched rows only (one all-reduce of those rows, each
// written by exactly one rank).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "parallel/collectives.h"

namespace hydra::parallel {

struct ReducedParam {
  std::string name;
  Tensor tensor;
  Communicator* group = nullptr;
  bool sparse = false;  // row-sparse gradient (Tensor::sparse_grad)
};

// One parameter's part of the optimizer update on this rank under ZeRO-1.
struct ParamShard {
  int64_t lo = 0,
          hi = 0;  // flat range of the local parameter (empty when another rank owns all of it)
  Tensor grad;     // its reduced gradient, [hi - lo]; undefined when no rank had one
  // Row-sparse parameters: [lo, hi) is whole rows; grad is [k, cols], the values of the k touched
  // rows in the range, and rows (i64 [k]) their indices counted from the range's first row.
  Tensor rows;
};

struct ReducerStats {
  double exposed_ms =
      0;  // communication not hidden behind the backward (GPU: device time; CPU: wait)
  double gather_ms = 0;  // ZeRO-1: time all_gather_params() took
  double bytes = 0;      // gradient bytes all-reduced this step
  int64_t buckets = 0;   // buckets started
  int64_t early = 0;     // buckets started from a hook during the backward (overlapped)
  int64_t copied = 0;    // gradients copied into a bucket (not written there by the backward)
  int64_t gathered_in_place = 0;  // ZeRO-1: buckets of one parameter, gathered into it with no copy
  int64_t gathered_packed = 0;  // ZeRO-1: buckets of several parameters, packed, gathered, unpacked
};

class GradientReducer {
 public:
  GradientReducer(std::vector<ReducedParam> params, double bucket_mb, bool shard = false);
  ~GradientReducer();
  GradientReducer(const GradientReducer&) = delete;
  GradientReducer& operator=(const GradientReducer&) = delete;

  // Before each backward.
  void prepare();
  // After the backward: every gradient is the sum over its group.
  void finish();
  const ReducerStats& stats() const { return stats_; }
  int64_t num_buckets() const { return static_cast<int64_t>(buckets_.size()); }

  // ZeRO-1. Parameters are indexed in the order given to the constructor.
  bool sharding() const { return shard_; }
  int64_t num_params() const { return static_cast<int64_t>(params_.size()); }
  const std::string& name(int i) const { return params_[i].name; }
  bool is_sharded(int i) const { return shard_; }  // every parameter, under ZeRO-1
  bool is_sparse(int i) const { return params_[i].sparse; }
  // Valid after finish() (the range is fixed; the gradient is this step's).
  ParamShard shard(int i) const;
  // After the optimizer updated every parameter's range on every rank: each bucket's slices are
  // all-gathered and copied into the parameters. Buckets whose parameters got no gradient are
  // skipped.
  void all_gather_params();

 private:
  struct Bucket {
    std::vector<int> params;  // indices into params_
    Communicator* group = nullptr;
    DType dtype = DType::kF32;
    Device device;
    int64_t numel = 0;
    std::vector<int64_t> offsets;  // of each parameter in the flat bucket
    int64_t slice = 0;  // ZeRO-1: elements per rank (numel padded to the group size, / size)
    Tensor shard;       // ZeRO-1: this rank's slice of the reduced gradient
    int ready = 0;
    bool started = false;
    Tensor flat;
    std::unique_ptr<Work> work;
  };
  void on_ready(int param);
  void start_ready_buckets();
  void start(Bucket& b);
  void reduce_sparse(int param);
  void share_rows(int param);

  std::vector<ReducedParam> params_;
  std::vector<int> bucket_of_;         // per param; -1 for row-sparse parameters
  std::vector<bool> seen_;             // per param, this step
  std::vector<double> had_;            // per param: it had a gradient when its bucket started
  std::vector<Communicator*> groups_;  // the dense parameters' groups, in order of first appearance
  std::vector<int> hook_ids_;
  std::vector<Bucket> buckets_;
  bool shard_ = false;
  std::vector<ParamShard> owned_;  // per param (ZeRO-1): lo, hi; the gradient is filled in shard()
  std::vector<int64_t>
      slice_pos_;  // per param (ZeRO-1): where its range starts in its bucket's slice
  // Per row-sparse param (ZeRO-1), this step: the run [first, last) of its merged, ascending
  // touched rows that falls in its range, and those rows counted from the range's first row.
  struct RowRun {
    int64_t first = 0, last = 0;
    Tensor local;
  };
  std::vector<RowRun> runs_;
  void find_run(int param);
  std::size_t next_ = 0;  // the next bucket to start
  bool active_ = false;
  ReducerStats stats_;
};

}  // namespace hydra::parallel
