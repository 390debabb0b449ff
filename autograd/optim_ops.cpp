#include "autograd/optim_ops.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "autograd/dispatch.h"
#include "kernels/optim.h"

namespace hydra {
namespace {

kernels::AdamWParams make_params(const Tensor& param, const Tensor& grad, const Tensor& m,
                                 const Tensor& v, const AdamWHyper& h) {
  HYDRA_CHECK(param.is_contiguous() && grad.is_contiguous() && m.is_contiguous() &&
              v.is_contiguous())
      << "adamw: tensors must be contiguous";
  HYDRA_CHECK(grad.dtype() == param.dtype() && m.dtype() == param.dtype() &&
              v.dtype() == param.dtype())
      << "adamw: param, grad and state differ in dtype";
  kernels::AdamWParams p;
  p.dtype = param.dtype();
  p.param = param.raw_data();
  p.grad = grad.raw_data();
  p.m = m.raw_data();
  p.v = v.raw_data();
  p.n = param.numel();
  p.lr = h.lr;
  p.beta1 = h.beta1;
  p.beta2 = h.beta2;
  p.eps = h.eps;
  p.weight_decay = h.weight_decay;
  p.bias_correction1 = 1 - std::pow(h.beta1, static_cast<double>(h.step));
  p.bias_correction2 = 1 - std::pow(h.beta2, static_cast<double>(h.step));
  p.grad_scale = h.grad_scale;
  if (h.sum_squares.defined()) {
    HYDRA_CHECK(h.sum_squares.dtype() == DType::kF64 && h.sum_squares.numel() == 1 &&
                h.sum_squares.device() == param.device() && h.sum_squares.is_contiguous())
        << "adamw: the clipping sum of squares must be one f64 on the parameters' device, got "
        << h.sum_squares.str();
    p.sum_squares = h.sum_squares.data<double>();
    p.clip = h.clip;
  }
  p.stream = current_stream(param.device());
  return p;
}

}  // namespace

void adamw_update(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v,
                  const AdamWHyper& h) {
  HYDRA_CHECK(grad.shape() == param.shape() && m.shape() == param.shape() &&
              v.shape() == param.shape())
      << "adamw: shapes differ: param " << shape_str(param.shape()) << ", grad "
      << shape_str(grad.shape());
  const kernels::AdamWParams p = make_params(param, grad, m, v, h);
  if (p.n > 0) HYDRA_LAUNCH(param.device(), adamw_step, p);
  param.storage()->bump_version();
}

void adamw_update_many(const std::vector<AdamWEntry>& entries, const AdamWHyper& h) {
  std::vector<std::vector<const AdamWEntry*>> groups;  // by (device, dtype), in order of appearance
  for (const AdamWEntry& e : entries) {
    HYDRA_CHECK(e.grad.shape() == e.param.shape() && e.m.shape() == e.param.shape() &&
                e.v.shape() == e.param.shape())
        << "adamw: shapes differ: param " << shape_str(e.param.shape()) << ", grad "
        << shape_str(e.grad.shape());
    auto it = std::find_if(groups.begin(), groups.end(), [&](const auto& g) {
      return g.front()->param.device() == e.param.device() &&
             g.front()->param.dtype() == e.param.dtype();
    });
    if (it == groups.end()) {
      groups.push_back({&e});
    } else {
      it->push_back(&e);
    }
  }
  for (const auto& g : groups) {
    const Device dev = g.front()->param.device();
    for (std::size_t first = 0; first < g.size(); first += kernels::MultiAdamWParams::kMax) {
      auto mp = std::make_unique<kernels::MultiAdamWParams>();
      mp->count = static_cast<int>(
          std::min<std::size_t>(kernels::MultiAdamWParams::kMax, g.size() - first));
      for (int i = 0; i < mp->count; ++i) {
        const AdamWEntry& e = *g[first + i];
        const kernels::AdamWParams one = make_params(e.param, e.grad, e.m, e.v, h);
        mp->t[i] = {one.param, one.grad, one.m, one.v, one.n, e.lr, e.weight_decay};
        if (i == 0) {
          mp->dtype = one.dtype;
          mp->beta1 = one.beta1;
          mp->beta2 = one.beta2;
          mp->eps = one.eps;
          mp->bias_correction1 = one.bias_correction1;
          mp->bias_correction2 = one.bias_correction2;
          mp->grad_scale = one.grad_scale;
          mp->sum_squares = one.sum_squares;
          mp->clip = one.clip;
          mp->stream = one.stream;
        }
      }
      HYDRA_LAUNCH(dev, multi_adamw_step, *mp);
    }
  }
  for (const AdamWEntry& e : entries) e.param.storage()->bump_version();
}

void adamw_update_rows(const Tensor& param, const Tensor& rows, const Tensor& values,
                       const Tensor& m, const Tensor& v, const AdamWHyper& h) {
  HYDRA_CHECK(param.dim() == 2 && values.dim() == 2 && values.size(1) == param.size(1) &&
              rows.numel() == values.size(0) && rows.dtype() == DType::kI64)
      << "adamw_rows: param " << shape_str(param.shape()) << ", rows " << shape_str(rows.shape())
      << ", values " << shape_str(values.shape());
  const Tensor r = rows.contiguous(), vals = values.contiguous();
  kernels::AdamWRowsParams p;
  p.base = make_params(param, vals, m, v, h);
  p.rows = r.data<int64_t>();
  p.num_rows = param.size(0);
  p.cols = param.size(1);
  p.k = rows.numel();
  if (p.k > 0) HYDRA_LAUNCH(param.device(), adamw_rows_step, p);
  param.storage()->bump_version();
}

void adamw_update_hit_rows(const Tensor& param, const Tensor& hits, const Tensor& values,
                           const Tensor& m, const Tensor& v, const AdamWHyper& h) {
  HYDRA_CHECK(param.dim() == 2 && values.shape() == param.shape() && hits.dim() == 1 &&
              hits.size(0) == param.size(0) && hits.dtype() == DType::kI32)
      << "adamw_hit_rows: param " << shape_str(param.shape()) << ", hits "
      << shape_str(hits.shape()) << " " << dtype_name(hits.dtype()) << ", values "
      << shape_str(values.shape()) << " (expected i32 [rows] and values of the param's shape)";
  const Tensor hit = hits.contiguous(), vals = values.contiguous();
  kernels::AdamWRowsParams p;
  p.base = make_params(param, vals, m, v, h);
  p.hits = hit.data<int32_t>();
  p.num_rows = param.size(0);
  p.cols = param.size(1);
  if (param.numel() > 0) HYDRA_LAUNCH(param.device(), adamw_rows_step, p);
  param.storage()->bump_version();
}

}  // namespace hydra
