// AdamW over a model's parameters, with parameter groups: no weight decay for norms, gates and biases
// (ParamOptions::weight_decay), an own learning rate for groups such as the PKM values, frozen
// parameters skipped, and lazy row updates for parameters with row-sparse gradients.
#pragma once

#include <functional>
#include <map>
#include <string>
#include <vector>

#include "autograd/module.h"
#include "configs/hydra.pb.h"

namespace hydra::trainer {

class AdamW {
 public:
  // lr_groups: learning rate of each ParamOptions::lr_group other than "" (the base rate).
  AdamW(std::vector<NamedParameter> params, const config::OptimizerConfig& cfg,
        std::map<std::string, double> lr_groups = {});

  // sqrt of the sum of squares of every gradient of a parameter that is not frozen (dense and sparse).
  double grad_norm() const;
  // The sum of squares of the gradients of the (unfrozen) parameters whose names pass `select`.
  double grad_sum_squares(const std::function<bool(const std::string&)>& select) const;
  // One update with base learning rate `lr`; group rates are scaled by lr / base_lr (so the schedule
  // shapes them too). Gradients are multiplied by grad_scale (clipping).
  void step(double lr, double base_lr, double grad_scale);
  int64_t steps() const { return steps_; }
  void set_steps(int64_t s) { steps_ = s; }

  // Freezing: frozen parameters stop requiring grad and are not updated.
  void set_frozen(const std::string& name, bool frozen);
  bool frozen(const std::string& name) const;

  // State for checkpoints: ("adam_m/<name>", m), ("adam_v/<name>", v).
  std::vector<std::pair<std::string, Tensor>> state() const;
  const std::vector<NamedParameter>& params() const { return params_; }

 private:
  struct Slot {
    Tensor m, v;
    bool frozen = false;
  };
  std::vector<NamedParameter> params_;
  std::vector<Slot> slots_;
  config::OptimizerConfig cfg_;
  std::map<std::string, double> lr_groups_;
  int64_t steps_ = 0;
};

}  // namespace hydra::trainer
