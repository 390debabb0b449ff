// Indexing: row gather/scatter-add (embedding, index_select/index_add on the first axis) and
// gather/scatter-add along an axis of an [outer, axis, inner] view. Scatter-adds are deterministic:
// each output element receives its contributions in index order.
#pragma once

#include "kernels/base/kernel.h"

namespace hydra::kernels {

// out[i, :] = table[index[i], :]
struct RowGatherParams {
  DType dtype = DType::kF32;
  DType index_dtype = DType::kI64;
  const void* table = nullptr;  // [num_rows, cols]
  const void* index = nullptr;  // [n]
  void* out = nullptr;          // [n, cols]
  int64_t n = 0, num_rows = 0, cols = 0;
  void* stream = nullptr;
};

// table[index[i], :] += src[i, :]. CUDA: rows of equal index are summed in index order after a
// stable sort (deterministic), or with atomics when kernels::deterministic() is off.
struct RowScatterAddParams {
  DType dtype = DType::kF32;
  DType index_dtype = DType::kI64;
  const void* src = nullptr;    // [n, cols]
  const void* index = nullptr;  // [n]
  void* table = nullptr;        // [num_rows, cols], accumulated into
  int64_t n = 0, num_rows = 0, cols = 0;
  void* workspace = nullptr;  // CUDA: row_scatter_add_workspace(p) bytes
  void* stream = nullptr;
};

// Along the middle axis: out[o, i, j] = x[o, index[o, i, j], j]   (gather)
//                        x[o, index[o, i, j], j] += src[o, i, j]  (scatter-add)
struct AxisIndexParams {
  DType dtype = DType::kF32;
  DType index_dtype = DType::kI64;
  const void* src = nullptr;  // gather: x [outer, axis, inner]; scatter: src [outer, count, inner]
  const void* index = nullptr;  // [outer, count, inner]
  void* dst = nullptr;          // gather: out [outer, count, inner]; scatter: x (accumulated into)
  int64_t outer = 1, axis = 1, count = 1, inner = 1;
  void* stream = nullptr;
};

HYDRA_DECLARE_KERNEL(row_gather, RowGatherParams)
HYDRA_DECLARE_KERNEL(row_scatter_add, RowScatterAddParams)
HYDRA_DECLARE_KERNEL(axis_gather, AxisIndexParams)
HYDRA_DECLARE_KERNEL(axis_scatter_add, AxisIndexParams)

}  // namespace hydra::kernels

namespace hydra::kernels {

// Weighted bag of rows (PKM's value read): out[t, :] = sum_k w[t, k] * table[index[t, k], :].
struct BagParams {
  DType dtype = DType::kF32;
  DType index_dtype = DType::kI64;
  const void* table = nullptr;    // [num_rows, cols]
  const void* index = nullptr;    // [n, m]
  const void* weights = nullptr;  // [n, m]
  void* out = nullptr;            // [n, cols]
  int64_t n = 0, m = 0, num_rows = 0, cols = 0;
  void* stream = nullptr;
};

// gw[t, k] = <gout[t, :], table[index[t, k], :]>;  grows[t*m + k, :] = w[t, k] * gout[t, :] (the table's
// gradient as rows, before rows of equal index are summed).
struct BagBwdParams {
  BagParams fwd;
  const void* gout = nullptr;  // [n, cols]
  void* gweights = nullptr;    // [n, m]
  void* grows = nullptr;       // [n * m, cols]
};

HYDRA_DECLARE_KERNEL(bag_fwd, BagParams)
HYDRA_DECLARE_KERNEL(bag_bwd, BagBwdParams)

namespace cuda {
size_t row_scatter_add_workspace(const RowScatterAddParams& p);
}  // namespace cuda

}  // namespace hydra::kernels
