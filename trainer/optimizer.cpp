#include "trainer/optimizer.h"

#include <cmath>

#include "autograd/grad_mode.h"
#include "autograd/ops.h"
#include "autograd/optim_ops.h"

namespace hydra::trainer {

AdamW::AdamW(std::vector<NamedParameter> params, const config::OptimizerConfig& cfg,
             std::map<std::string, double> lr_groups)
    : params_(std::move(params)), cfg_(cfg), lr_groups_(std::move(lr_groups)) {
  for (const auto& p : params_) {
    HYDRA_CHECK(p.options.lr_group.empty() || lr_groups_.count(p.options.lr_group))
        << "optimizer: no learning rate for group '" << p.options.lr_group << "' of " << p.name;
    slots_.push_back({zeros_like(p.tensor), zeros_like(p.tensor), false});
  }
}

std::vector<Tensor> AdamW::grads_to_clip(const std::function<bool(const std::string&)>& select,
                                         GradPart part) const {
  std::vector<Tensor> grads;
  for (std::size_t i = 0; i < params_.size(); ++i) {
    if (slots_[i].frozen || !select(params_[i].name)) continue;
    if (slots_[i].sharded) {
      if (part == GradPart::kReplicated) continue;
      const Tensor g = reducer_->shard(static_cast<int>(i)).grad;
      if (g.defined()) grads.push_back(g);
      continue;
    }
    if (part == GradPart::kSharded) continue;
    const Tensor& t = params_[i].tensor;
    if (const auto& sg = t.sparse_grad_as_is()) {  // a pending one's whole table: no host wait
      grads.push_back(sg->pending && sg->dense.defined() ? sg->dense : t.sparse_grad()->values);
    } else if (t.grad().defined()) {
      grads.push_back(t.grad());
    }
  }
  return grads;
}

double AdamW::grad_sum_squares(const std::function<bool(const std::string&)>& select,
                               GradPart part) const {
  NoGradGuard ng;
  return sum_squares_all(grads_to_clip(select, part));
}

Tensor AdamW::grad_sum_squares_on_device(const std::function<bool(const std::string&)>& select,
                                         GradPart part) const {
  NoGradGuard ng;
  return sum_squares_all_on(grads_to_clip(select, part), device());
}

Device AdamW::device() const {
  return params_.empty() ? Device::cpu() : params_.front().tensor.device();
}

void AdamW::shard_over(parallel::GradientReducer* reducer) {
  HYDRA_CHECK(reducer != nullptr && reducer->sharding())
      << "optimizer: ZeRO-1 needs a sharding gradient reducer";
  HYDRA_CHECK(reducer->num_params() == static_cast<int64_t>(params_.size()))
      << "optimizer: the reducer lists " << reducer->num_params() << " parameters, the optimizer "
      << params_.size();
  reducer_ = reducer;
  for (std::size_t i = 0; i < params_.size(); ++i) {
    const int k = static_cast<int>(i);
    HYDRA_CHECK(reducer->name(k) == params_[i].name)
        << "optimizer: parameter " << i << " is " << params_[i].name << " here and "
        << reducer->name(k) << " in the reducer";
    if (!reducer->is_sharded(k)) continue;
    Slot& s = slots_[i];
    const parallel::ParamShard range = reducer->shard(k);
    s.sharded = true;
    s.sparse = reducer->is_sparse(k);
    s.lo = range.lo;
    s.hi = range.hi;
    const Tensor& p = params_[i].tensor;
    const Shape shape = s.sparse ? Shape{(s.hi - s.lo) / p.size(1), p.size(1)} : Shape{s.hi - s.lo};
    s.m = zeros(shape, p.dtype(), p.device());
    s.v = zeros(shape, p.dtype(), p.device());
  }
}

int64_t AdamW::state_bytes() const {
  int64_t bytes = 0;
  for (const Slot& s : slots_)
    bytes += (s.m.numel() + s.v.numel()) * static_cast<int64_t>(dtype_size(s.m.dtype()));
  return bytes;
}

double AdamW::grad_norm() const {
  return std::sqrt(grad_sum_squares([](const std::string&) { return true; }));
}

void AdamW::step(double lr, double base_lr, double grad_scale) {
  AdamWHyper shared;
  shared.grad_scale = grad_scale;
  update(lr, base_lr, shared);
}

void AdamW::step(double lr, double base_lr, const Tensor& sum_squares, double clip) {
  AdamWHyper shared;
  shared.sum_squares = sum_squares;
  shared.clip = clip;
  update(lr, base_lr, shared);
}

void AdamW::update(double lr, double base_lr, AdamWHyper shared) {
  NoGradGuard ng;
  ++steps_;
  shared.beta1 = cfg_.beta1();
  shared.beta2 = cfg_.beta2();
  shared.eps = cfg_.eps();
  shared.step = steps_;
  std::vector<AdamWEntry> dense;  // one fused update for all of them
  for (std::size_t i = 0; i < params_.size(); ++i) {
    const NamedParameter& p = params_[i];
    Slot& s = slots_[i];
    if (s.frozen) continue;
    // A group's peak rate, scaled like the base (a group rate <= 0: the base's own).
    const double group_lr = p.options.lr_group.empty() || lr_groups_.at(p.options.lr_group) <= 0
                                ? base_lr
                                : lr_groups_.at(p.options.lr_group);
    AdamWHyper h = shared;
    h.lr = base_lr > 0 ? lr * group_lr / base_lr : 0.0;
    h.weight_decay = p.options.weight_decay ? cfg_.weight_decay() : 0.0;
    if (s.sharded) {
      const parallel::ParamShard sh = reducer_->shard(static_cast<int>(i));
      if (!sh.grad.defined()) continue;
      if (s.sparse) {  // the touched rows among this rank's rows
        adamw_update_rows(p.tensor.narrow(0, s.lo / p.tensor.size(1), s.m.size(0)), sh.rows,
                          sh.grad, s.m, s.v, h);
      } else {
        dense.push_back({p.tensor.reshape({-1}).narrow(0, s.lo, s.hi - s.lo), sh.grad, s.m, s.v,
                         h.lr, h.weight_decay});
      }
    } else if (const auto& sg = p.tensor.sparse_grad_as_is()) {
      if (sg->pending && sg->dense.defined()) {  // every row hit, from the whole table's gradient
        adamw_update_hit_rows(p.tensor, sg->hits, sg->dense.to(p.tensor.dtype()), s.m, s.v, h);
      } else {
        const auto& rows = p.tensor.sparse_grad();
        adamw_update_rows(p.tensor, rows->rows, rows->values, s.m, s.v, h);
      }
    } else if (p.tensor.grad().defined()) {
      dense.push_back({p.tensor, p.tensor.grad(), s.m, s.v, h.lr, h.weight_decay});
    }
  }
  adamw_update_many(dense, shared);
  if (reducer_ != nullptr) reducer_->all_gather_params();  // every rank's ranges to every rank
}

void AdamW::set_frozen(const std::string& name, bool frozen) {
  for (std::size_t i = 0; i < params_.size(); ++i) {
    if (params_[i].name != name) continue;
    slots_[i].frozen = frozen;
    params_[i].tensor.set_requires_grad(!frozen);
    return;
  }
  HYDRA_FAIL() << "optimizer: no parameter named " << name;
}

bool AdamW::frozen(const std::string& name) const {
  for (std::size_t i = 0; i < params_.size(); ++i)
    if (params_[i].name == name) return slots_[i].frozen;
  return false;
}

std::vector<OptimizerState> AdamW::state() const {
  std::vector<OptimizerState> out;
  for (std::size_t i = 0; i < params_.size(); ++i) {
    const Slot& s = slots_[i];
    out.push_back({"adam_m/" + params_[i].name, params_[i].name, s.m, s.sharded, s.lo});
    out.push_back({"adam_v/" + params_[i].name, params_[i].name, s.v, s.sharded, s.lo});
  }
  return out;
}

}  // namespace hydra::trainer
