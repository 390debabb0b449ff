// The MoE's weighted combine (model/moe.cpp): each token's expert outputs, read from the dispatch
// order (kernels/moe_route.h), weighted by their (chunk, expert) pair's routing weight and summed,
//
//   out[t] = sum_k w[widx[i]] * y[i],  i = inverse[t, k] (entries < 0 skipped, k ascending),
//
// with w[p] = 0 for p >= pairs (the tiled order's padding rows). Backward, from gout:
//
//   gy[i] = w[widx[i]] * gout[perm[i]]           (0 on padding rows: their weight is 0)
//   gw[p] = sum_i dot(gout[perm[i]], y[i])       over the dispatch rows i of pair p
//
// One op instead of a gather of the weights by dispatch row (whose backward sorted the rows to
// scatter-add them), a broadcast multiply and the token-order gather-sum. The rows of a pair are
// its chunk's chunk_len tokens (chunk routing: every token of a chunk has the same pairs, at the
// same k), so gw[p] sums, for the pair's chunk q and its k, dot(gout[t], y[inverse[t, k]]) over
// t = q * chunk_len .. + chunk_len - 1 in order: no atomics, no sort, deterministic. Sums in fp32
// (fp64 for f64).
#pragma once

#include "kernels/base/kernel.h"

namespace hydra::kernels {

struct MoeCombineParams {
  DType dtype = DType::kF32;  // of y, w, out (and gout, gy, gw)
  int64_t tokens = 0;         // rows of out: batch * chunks * chunk_len
  int64_t K = 0;              // inverse's columns
  int64_t rows = 0;           // dispatch rows of y (perm and widx hold at least as many)
  int64_t cols = 0;
  int64_t pairs = 0;                 // entries of w: batch * chunks * experts
  int64_t experts = 0;               // pair p = chunk * experts + expert
  int64_t chunk_len = 1;             // tokens per chunk
  const void* y = nullptr;           // [rows, cols] contiguous
  const void* w = nullptr;           // [pairs]
  const int64_t* inverse = nullptr;  // [tokens, K]
  const int64_t* widx = nullptr;     // [>= rows]
  void* out = nullptr;               // [tokens, cols]
  void* stream = nullptr;
};

struct MoeCombineBwdParams {
  MoeCombineParams fwd;           // fwd.out unused
  const int64_t* perm = nullptr;  // [>= rows]: each dispatch row's token
  const void* gout = nullptr;     // [tokens, cols]
  void* gy = nullptr;             // [rows, cols] or null
  void* gw = nullptr;             // [pairs] or null
};

HYDRA_DECLARE_KERNEL(moe_combine_fwd, MoeCombineParams)
HYDRA_DECLARE_KERNEL(moe_combine_bwd, MoeCombineBwdParams)

}  // namespace hydra::kernels
