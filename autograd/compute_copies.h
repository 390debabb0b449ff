// Mixed precision: low-precision compute copies of a module's fp32 master parameters.
//
// The parameters stay the masters that the optimizer, the gradient reducer and checkpoints work on.
// Between enter() and exit(), every parameter handle refers to a copy in the compute dtype (bf16)
// refreshed from its master at enter(), so the forward and backward passes compute in that dtype
// (activations follow the parameters); gradients accumulate in the master's dtype
// (Tensor::grad_dtype), also across micro-batches and in the reducer's buckets. exit() points the
// handles back at the masters, keeping the gradients. Parameters registered with
// ParamOptions::keep_master_dtype have no copy: they compute in their master dtype throughout.
#pragma once

#include <vector>

#include "autograd/module.h"

namespace hydra {

class ComputeCopies {
 public:
  ComputeCopies(const Module& module, DType compute);
  ComputeCopies(const ComputeCopies&) = delete;
  ComputeCopies& operator=(const ComputeCopies&) = delete;
  ~ComputeCopies();

  // Casts every master into its copy (one pass over the parameters) and points the handles at the
  // copies.
  void enter();
  // Casts now, outside enter() (the trainer: right after the optimizer's update is queued, while
  // the device works); the next enter() skips its cast when no master has changed since (same
  // storage and version).
  void refresh();
  // Points the handles back at the masters.
  void exit();
  bool active() const { return active_; }
  DType compute_dtype() const { return compute_; }
  // Memory held by the copies.
  int64_t bytes() const;

  // enter() for the lifetime of the scope (nothing when `copies` is null).
  class Scope {
   public:
    explicit Scope(ComputeCopies* copies) : copies_(copies) {
      if (copies_ != nullptr) copies_->enter();
    }
    ~Scope() {
      if (copies_ != nullptr) copies_->exit();
    }
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

   private:
    ComputeCopies* copies_;
  };

 private:
  // The copies' shapes and devices follow the parameters'; true when any was made anew.
  bool fit_copies();
  bool fresh() const;  // refresh() ran and no master changed since

  std::vector<Tensor> params_, masters_, copies_;
  struct Seen {
    const void* storage = nullptr;
    uint32_t version = 0;
  };
  std::vector<Seen> refreshed_;  // each master at the last refresh(); empty: none to reuse
  DType compute_;
  bool active_ = false;
};

}  // namespace hydra
