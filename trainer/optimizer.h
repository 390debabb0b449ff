// AdamW over a model's parameters, with parameter groups: no weight decay for norms, gates and
// biases (ParamOptions::weight_decay), an own learning rate for groups such as the PKM values,
// frozen parameters skipped, and lazy row updates for parameters with row-sparse gradients.
#pragma once

#include <functional>
#include <map>
#include <string>
#include <vector>

#include "autograd/module.h"
#include "autograd/optim_ops.h"
#include "configs/hydra.pb.h"
#include "parallel/reducer.h"

namespace hydra::trainer {

// One tensor of optimizer state, as checkpoints store it.
struct OptimizerState {
  std::string name;   // "adam_m/<param>" or "adam_v/<param>"
  std::string param;  // the parameter's name
  Tensor tensor;      // the parameter's shape, or under ZeRO-1 the 1-D range [lo, hi) of the flat
                      // parameter
  bool sharded = false;
  int64_t lo = 0;  // where that range starts in the (local) flat parameter
};

// Which gradients grad_sum_squares counts: all, only the ZeRO-1 ranges this rank owns, or only the
// parameters every rank updates whole (not sharded).
enum class GradPart { kAll, kSharded, kReplicated };

class AdamW {
 public:
  // lr_groups: learning rate of each ParamOptions::lr_group other than "" (the base rate).
  AdamW(std::vector<NamedParameter> params, const config::OptimizerConfig& cfg,
        std::map<std::string, double> lr_groups = {});

  // sqrt of the sum of squares of every gradient of a parameter that is not frozen (dense and
  // sparse).
  double grad_norm() const;
  // The sum of squares of the gradients of the (unfrozen) parameters whose names pass `select`.
  double grad_sum_squares(const std::function<bool(const std::string&)>& select,
                          GradPart part = GradPart::kAll) const;
  // The same sum as an f64 [1] tensor on the parameters' device; the host does not wait for it.
  Tensor grad_sum_squares_on_device(const std::function<bool(const std::string&)>& select,
                                    GradPart part = GradPart::kAll) const;
  Device device() const;  // the parameters' (the first one's)

  // ZeRO-1: from now on the moments of each parameter the reducer shards cover only this rank's
  // range (reset to zero: call before loading a checkpoint), its gradient comes from the reducer's
  // slice, and step() ends with the reducer's all-gather of the updated parameters. The reducer
  // must list the same parameters in the same order and outlive the optimizer's use.
  void shard_over(parallel::GradientReducer* reducer);
  bool sharded() const { return reducer_ != nullptr; }
  // Bytes of optimizer state this rank holds.
  int64_t state_bytes() const;
  // One update with base learning rate `lr`; group rates are scaled by lr / base_lr (so the
  // schedule shapes them too). Gradients are multiplied by grad_scale (clipping).
  void step(double lr, double base_lr, double grad_scale);
  // The same with clipping on the device: the factor comes from `sum_squares` (the gradients' sum
  // of squares, f64 [1] on the parameters' device) and `clip` (0: none) as the kernels compute it
  // (kernels/optim.h); a non-finite norm updates nothing. The host does not wait for the device.
  void step(double lr, double base_lr, const Tensor& sum_squares, double clip);
  int64_t steps() const { return steps_; }
  void set_steps(int64_t s) { steps_ = s; }

  // Freezing: frozen parameters stop requiring grad and are not updated.
  void set_frozen(const std::string& name, bool frozen);
  bool frozen(const std::string& name) const;

  // State for checkpoints: adam_m/<name> and adam_v/<name> of every parameter (ranges under
  // ZeRO-1).
  std::vector<OptimizerState> state() const;
  const std::vector<NamedParameter>& params() const { return params_; }

 private:
  std::vector<Tensor> grads_to_clip(const std::function<bool(const std::string&)>& select,
                                    GradPart part) const;
  void update(double lr, double base_lr, AdamWHyper shared);

  struct Slot {
    Tensor m, v;
    bool frozen = false;
    bool sharded = false;  // ZeRO-1: m and v hold the flat range [lo, hi)
    bool sparse = false;   // ... of whole rows ([rows, cols]) of a row-sparse parameter
    int64_t lo = 0, hi = 0;
  };
  std::vector<NamedParameter> params_;
  std::vector<Slot> slots_;
  config::OptimizerConfig cfg_;
  std::map<std::string, double> lr_groups_;
  int64_t steps_ = 0;
  parallel::GradientReducer* reducer_ = nullptr;  // ZeRO-1
};

}  // namespace hydra::trainer
