// A residual stream plus gated, optionally mixed, path outputs (a Hydra block's combine):
//   y[r, c] = x[r, c] + sum_i out_i[r, c] * gate_i[c] * m_i[r],   m_i[r] = mix[r, i] (1 without
//   mix)
// over rows r of `cols` elements and up to kMaxPaths paths. The backward gives, for gy = dL/dy,
//   gout_i[r, c] = gy[r, c] * gate_i[c] * m_i[r]
//   ggate_i[c]   = sum_r gy[r, c] * out_i[r, c] * m_i[r]
//   gmix[r, i]   = sum_c gy[r, c] * out_i[r, c] * gate_i[c]
// (the residual's gradient is gy itself). One pass over the rows each way, where the composed
// mul/mul/add and their backward take about ten passes and launches a path.
#pragma once

#include <cstddef>

#include "kernels/base/kernel.h"

namespace hydra::kernels {

constexpr int kGatedResidualMaxPaths = 4;

struct GatedResidualParams {
  DType dtype = DType::kF32;
  const void* x = nullptr;                         // [rows, cols]
  const void* outs[kGatedResidualMaxPaths] = {};   // each [rows, cols]
  const void* gates[kGatedResidualMaxPaths] = {};  // each [cols]
  const void* mix = nullptr;                       // [rows, paths] or null
  int paths = 0;
  int64_t rows = 0, cols = 0;
  void* y = nullptr;  // [rows, cols]
  void* stream = nullptr;
};

struct GatedResidualBwdParams {
  GatedResidualParams fwd;  // x and y unused
  const void* gy = nullptr;
  void* gouts[kGatedResidualMaxPaths] = {};   // each [rows, cols], or null (not wanted)
  void* ggates[kGatedResidualMaxPaths] = {};  // each [cols] (written, not accumulated), or null
  void* gmix = nullptr;                       // [rows, paths] or null
  void* workspace = nullptr;  // CUDA: gated_residual_bwd_workspace(p) bytes (partial gate sums)
};

HYDRA_DECLARE_KERNEL(gated_residual_fwd, GatedResidualParams)
HYDRA_DECLARE_KERNEL(gated_residual_bwd, GatedResidualBwdParams)

namespace cuda {
size_t gated_residual_bwd_workspace(const GatedResidualBwdParams& p);
}  // namespace cuda

}  // namespace hydra::kernels
