// Finite-difference gradient check in float64: compares the engine's gradients of
// L = sum_i <out_i, W_i> (W_i fixed random weights, so every output element matters) with central
// differences (L(x + eps) - L(x - eps)) / 2eps for every element of every input that requires grad.
#pragma once

#include <functional>
#include <vector>

#include "autograd/tensor.h"
#include "base/status.h"

namespace hydra {

struct GradcheckOptions {
  double eps = 1e-6;
  double atol = 1e-6;
  double rtol = 1e-5;
  uint64_t seed = 7;
  // When > 0, check only this many elements of each input (evenly spread, always including the
  // first and last): whole-model checks in reasonable time.
  int64_t max_elements_per_input = 0;
};

using GradcheckFn = std::function<std::vector<Tensor>(const std::vector<Tensor>& inputs)>;

// Inputs that require grad must be contiguous f64 CPU tensors. Returns OK, or the worst mismatches.
Status gradcheck(const GradcheckFn& fn, const std::vector<Tensor>& inputs,
                 const GradcheckOptions& options = {});

}  // namespace hydra
