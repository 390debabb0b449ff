// Modules hold named parameters and child modules; names are hierarchical
// ("blocks.3.ssm.in_proj.weight"). Each parameter carries its optimizer options (weight decay on or
// off, a learning-rate group).
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "autograd/tensor.h"

namespace hydra {

struct ParamOptions {
  bool weight_decay = true;  // off for norms, gates, biases
  std::string lr_group =
      "";  // "" = the base learning rate; others have their own (e.g. "pkm_values")
  std::string freeze_group = "";  // curriculum stages may freeze a group by name (e.g. "backbone")
  bool sparse_grad = false;  // gradients arrive row-sparse (Tensor::sparse_grad), e.g. PKM values
  // Mixed precision leaves it in its master dtype (no low-precision compute copy), for parameters
  // whose results are precision-sensitive and cheap, e.g. the MoE router (its top-k decisions and
  // aux losses).
  bool keep_master_dtype = false;
};

struct NamedParameter {
  std::string name;
  Tensor tensor;
  ParamOptions options;
};

class Module {
 public:
  virtual ~Module() = default;
  Module() = default;
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;

  // All parameters below this module, depth first in registration order.
  std::vector<NamedParameter> named_parameters(const std::string& prefix = "") const;
  std::vector<Tensor> parameters() const;
  int64_t num_parameters() const;
  // The parameter with this full dotted name, or an undefined tensor.
  Tensor find_parameter(const std::string& name) const;
  void zero_grad();
  // Non-trainable state saved with checkpoints (e.g. adaptive loss coefficients), by full dotted
  // name.
  std::vector<std::pair<std::string, Tensor>> named_buffers(const std::string& prefix = "") const;
  // Moves every parameter to `device` / converts it to `dtype` in place: existing handles see the
  // change.
  void to(Device device);
  void to(DType dtype);
  // Replaces the data behind a parameter (or buffer) handle, keeping the handle and every copy of
  // it valid (e.g. keeping only this rank's slice of a sharded parameter). Drops its gradient
  // unless `keep_grad` (switching between a master and its compute copy:
  // autograd/compute_copies.h).
  static void replace_data(const Tensor& param, const Tensor& data, bool keep_grad = false);

 protected:
  Tensor register_parameter(const std::string& name, Tensor t, ParamOptions options = {});
  Tensor register_buffer(const std::string& name, Tensor t);
  template <class M>
  std::shared_ptr<M> register_module(const std::string& name, std::shared_ptr<M> m) {
    check_new_name(name);
    children_.emplace_back(name, m);
    return m;
  }

 private:
  void check_new_name(const std::string& name) const;
  void collect_parameters(std::vector<Tensor>& out) const;  // parameters(), appended to out
  std::vector<NamedParameter> params_;
  std::vector<std::pair<std::string, Tensor>> buffers_;
  std::vector<std::pair<std::string, std::shared_ptr<Module>>> children_;
};

// A list of modules named by position: "0", "1", ...
class ModuleList : public Module {
 public:
  template <class M>
  std::shared_ptr<M> push_back(std::shared_ptr<M> m) {
    items_.push_back(m);
    return register_module(std::to_string(items_.size() - 1), std::move(m));
  }
  std::size_t size() const { return items_.size(); }
  template <class M>
  M& at(std::size_t i) const {
    return dynamic_cast<M&>(*items_.at(i));
  }
  template <class M>
  std::shared_ptr<M> ptr(std::size_t i) const {
    auto p = std::dynamic_pointer_cast<M>(items_.at(i));
    HYDRA_CHECK(p != nullptr) << "ModuleList item " << i << " is not of the requested type";
    return p;
  }

 private:
  std::vector<std::shared_ptr<Module>> items_;
};

}  // namespace hydra
