// A [B, L, W] tensor as the sequence kernels take it: rows of W contiguous values a fixed stride
// apart, so slices of a projection's output need no copy (internal to autograd/).
#pragma once

#include "autograd/tensor.h"

namespace hydra {

struct Rows {
  Tensor t;
  int64_t row = 0;  // elements from one token's row to the next
};

// `t` itself where it is such rows, else a contiguous copy.
inline Rows as_rows(const Tensor& t) {
  const int64_t B = t.size(0), L = t.size(1), W = t.size(2);
  const bool inner_ok = t.stride(2) == 1 || W == 1;
  const int64_t r = L > 1 ? t.stride(1) : (B > 1 ? t.stride(0) : W);
  const bool outer_ok = B == 1 || L == 1 || t.stride(0) == L * r;
  if (inner_ok && outer_ok && r >= W) return {t, r};
  return {t.contiguous(), W};
}

}  // namespace hydra
