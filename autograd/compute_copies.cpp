#include "autograd/compute_copies.h"

#include "autograd/grad_mode.h"

namespace hydra {

ComputeCopies::ComputeCopies(const Module& module, DType compute) : compute_(compute) {
  HYDRA_CHECK(is_floating(compute))
      << "compute copies: " << dtype_name(compute) << " is not a floating dtype";
  for (const NamedParameter& p : module.named_parameters()) {
    HYDRA_CHECK(is_floating(p.tensor.dtype()))
        << "compute copies: parameter " << p.name << " is not floating";
    if (p.options.keep_master_dtype) continue;
    params_.push_back(p.tensor);
    copies_.push_back(Tensor::empty(p.tensor.shape(), compute, p.tensor.device()));
  }
  masters_.resize(params_.size());
}

ComputeCopies::~ComputeCopies() {
  if (active_) exit();
}

bool ComputeCopies::fit_copies() {
  bool made = false;
  for (std::size_t i = 0; i < params_.size(); ++i) {
    const Tensor& p = params_[i];
    if (copies_[i].shape() != p.shape() ||
        copies_[i].device() != p.device()) {  // resharded or moved since
      copies_[i] = Tensor::empty(p.shape(), compute_, p.device());
      made = true;
    }
  }
  return made;
}

bool ComputeCopies::fresh() const {
  if (refreshed_.size() != params_.size()) return false;
  for (std::size_t i = 0; i < params_.size(); ++i)
    if (refreshed_[i].storage != params_[i].storage().get() ||
        refreshed_[i].version != params_[i].version())
      return false;
  return true;
}

void ComputeCopies::refresh() {
  HYDRA_CHECK(!active_) << "compute copies: refresh() between enter() and exit()";
  NoGradGuard no_grad;
  fit_copies();
  for (std::size_t i = 0; i < params_.size(); ++i) masters_[i] = params_[i].detach();
  copy_many_(copies_, masters_);
  refreshed_.resize(params_.size());
  for (std::size_t i = 0; i < params_.size(); ++i) {
    refreshed_[i] = {params_[i].storage().get(), params_[i].version()};
    masters_[i] = Tensor();
  }
}

void ComputeCopies::enter() {
  HYDRA_CHECK(!active_) << "compute copies: enter() twice without exit()";
  NoGradGuard no_grad;
  const bool made = fit_copies();
  for (std::size_t i = 0; i < params_.size(); ++i) masters_[i] = params_[i].detach();
  // One launch for all (a launch per parameter cost ~100 a step), unless refresh() cast them.
  if (made || !fresh()) copy_many_(copies_, masters_);
  refreshed_.clear();  // a refresh serves one enter()
  for (std::size_t i = 0; i < params_.size(); ++i) {
    const Tensor& p = params_[i];
    p.set_grad_dtype(masters_[i].dtype());
    Module::replace_data(p, copies_[i], /*keep_grad=*/true);
  }
  active_ = true;
}

void ComputeCopies::exit() {
  HYDRA_CHECK(active_) << "compute copies: exit() without enter()";
  for (std::size_t i = 0; i < params_.size(); ++i) {
    Module::replace_data(params_[i], masters_[i], /*keep_grad=*/true);
    masters_[i] = Tensor();
  }
  active_ = false;
}

int64_t ComputeCopies::bytes() const {
  int64_t b = 0;
  for (const Tensor& c : copies_) b += c.numel() * static_cast<int64_t>(dtype_size(c.dtype()));
  return b;
}

}  // namespace hydra
