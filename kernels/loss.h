// Fused cross-entropy with logits: loss_i = logsumexp(x_i) - x_i[t_i]; rows whose target equals
// ignore_index give 0 and no gradient. Probabilities are never stored: the backward recomputes
// softmax from the saved log-sum-exp. A target outside [0, vocab) that is not ignore_index: the CPU
// kernel fails naming it; the CUDA kernel (which cannot stop the host without a synchronisation)
// writes NaN for that row's loss, so the sum or mean is NaN, and the backward gives the row NaN
// gradients.
#pragma once

#include "kernels/base/kernel.h"

namespace hydra::kernels {

struct CrossEntropyParams {
  DType dtype = DType::kF32;  // of logits
  DType target_dtype = DType::kI64;
  const void* logits = nullptr;   // [rows, vocab]
  const void* targets = nullptr;  // [rows]
  void* loss = nullptr;           // [rows], accumulate dtype
  void* lse = nullptr;            // [rows], accumulate dtype
  void* counted =
      nullptr;  // optional [rows], accumulate dtype: 1 where the target is not ignore_index
  int64_t rows = 0, vocab = 0;
  int64_t ignore_index = -100;
  void* stream = nullptr;
};

// glogits[i, j] = grow[i] * (softmax(x_i)[j] - [j == t_i]); ignored rows get 0.
struct CrossEntropyBwdParams {
  DType dtype = DType::kF32;
  DType target_dtype = DType::kI64;
  const void* logits = nullptr;
  const void* targets = nullptr;
  const void* lse = nullptr;
  const void* grow = nullptr;  // [rows], accumulate dtype
  void* glogits = nullptr;
  int64_t rows = 0, vocab = 0;
  int64_t ignore_index = -100;
  void* stream = nullptr;
};

// The mean over the counted rows, in one launch: out = sum(loss) / max(sum(counted), 1) and
// inv = 1 / max(sum(counted), 1) (for the backward), each one value of `dtype` (f32 or f64). Sums
// run in a fixed order.
struct CrossEntropyMeanParams {
  DType dtype = DType::kF32;
  const void* loss = nullptr;     // [rows]
  const void* counted = nullptr;  // [rows]
  void* out = nullptr;
  void* inv = nullptr;
  int64_t rows = 0;
  void* stream = nullptr;
};

HYDRA_DECLARE_KERNEL(cross_entropy_fwd, CrossEntropyParams)
HYDRA_DECLARE_KERNEL(cross_entropy_mean, CrossEntropyMeanParams)
HYDRA_DECLARE_KERNEL(cross_entropy_bwd, CrossEntropyBwdParams)

}  // namespace hydra::kernels
