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

void ComputeCopies::enter() {
  HYDRA_CHECK(!active_) << "compute copies: enter() twice without exit()";
  NoGradGuard no_grad;
  for (std::size_t i = 0; i < params_.size(); ++i) {
    const Tensor& p = params_[i];
    if (copies_[i].shape() != p.shape() ||
        copies_[i].device() != p.device())  // resharded or moved since
      copies_[i] = Tensor::empty(p.shape(), compute_, p.device());
    masters_[i] = p.detach();
  }
  copy_many_(copies_, masters_);  // one launch for all (a launch per parameter cost ~100 a step)
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
