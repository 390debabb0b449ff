// In-place optimizer updates on tensors (no autograd), dispatched to the device's fused kernel.
#pragma once

#include "autograd/tensor.h"

namespace hydra {

struct AdamWHyper {
  double lr = 0, beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0;
  int64_t step = 1;       // 1-based, for bias correction
  double grad_scale = 1;  // clipping factor
  // Clipping on the device instead (kernels/optim.h): the gradients' sum of squares, f64 [1] on the
  // parameters' device; the factor is clip / (norm + 1e-6) when clip > 0 and the norm exceeds it,
  // and a non-finite norm leaves everything as it was.
  Tensor sum_squares;
  double clip = 0;
};
// The host-factor hyper-parameters in one call.
inline AdamWHyper adamw_hyper(double lr, double beta1, double beta2, double eps,
                              double weight_decay, int64_t step, double grad_scale) {
  AdamWHyper h;
  h.lr = lr;
  h.beta1 = beta1;
  h.beta2 = beta2;
  h.eps = eps;
  h.weight_decay = weight_decay;
  h.step = step;
  h.grad_scale = grad_scale;
  return h;
}

// param, grad, m, v: same shape, dtype and device, contiguous.
void adamw_update(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v,
                  const AdamWHyper& h);
// Dense parameters updated together: one fused launch per device, dtype and 160 tensors. Entries
// carry their own lr and weight decay; h gives the rest (its lr and weight_decay are ignored).
struct AdamWEntry {
  Tensor param, grad, m, v;
  double lr = 0, weight_decay = 0;
};
void adamw_update_many(const std::vector<AdamWEntry>& entries, const AdamWHyper& h);
// The rows `rows` (i64 [k]) of a 2-D param with gradient values [k, cols]; m and v like param.
void adamw_update_rows(const Tensor& param, const Tensor& rows, const Tensor& values,
                       const Tensor& m, const Tensor& v, const AdamWHyper& h);
// The rows r of a 2-D param with hits[r] != 0 (i32 [rows]); values: the param's shape (the rows not
// hit are not read). The same update as adamw_update_rows on those rows, without their list.
void adamw_update_hit_rows(const Tensor& param, const Tensor& hits, const Tensor& values,
                           const Tensor& m, const Tensor& v, const AdamWHyper& h);

}  // namespace hydra
