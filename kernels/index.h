// Indexing: row gather/scatter-add/gather-sum (embedding, index_select/index_add on the first axis)
// and gather/scatter-add along an axis of an [outer, axis, inner] view. Scatter-adds are
// deterministic: each output element receives its contributions in index order.
#pragma once

#include "kernels/base/kernel.h"

namespace hydra::kernels {

// out[i, :] = table[index[i], :]
struct GatherRowsParams {
  DType dtype = DType::kF32;
  DType index_dtype = DType::kI64;
  const void* table = nullptr;  // [num_rows, cols]
  const void* index = nullptr;  // [n]
  void* out = nullptr;          // [n, cols]
  int64_t n = 0, num_rows = 0, cols = 0;
  void* stream = nullptr;
};

// table[index[i], :] += src[i, :]. CUDA: rows of equal index are summed in index order after a
// stable sort (deterministic), or with atomics when hydra::deterministic() is off.
struct ScatterAddRowsParams {
  DType dtype = DType::kF32;
  DType index_dtype = DType::kI64;
  const void* src = nullptr;    // [n, cols]
  const void* index = nullptr;  // [n]
  void* table = nullptr;        // [num_rows, cols], accumulated into
  int64_t n = 0, num_rows = 0, cols = 0;
  void* workspace = nullptr;  // CUDA: scatter_add_rows_workspace(p) bytes
  void* stream = nullptr;
};

// out[r, :] = the sum of src[inverse[r, k], :] over k = 0 .. K - 1 where inverse[r, k] >= 0, in k
// order, accumulated in the compute type (a zero row where there is none): the scatter-add
// table[index[i]] += src[i] into a zero table, for when each destination row knows its sources
// (the MoE combine: a token's rows from its experts). No sort, no atomics, deterministic.
// accumulate: out[r, :] += the sum (added to it in the compute type, one rounding), into a
// gradient summed so far.
struct GatherSumRowsParams {
  DType dtype = DType::kF32;
  const void* src = nullptr;         // [num_src, cols]
  const int64_t* inverse = nullptr;  // [rows, K], entries in [-1, num_src)
  void* out = nullptr;               // [rows, cols]
  bool accumulate = false;
  int64_t rows = 0, K = 0, cols = 0, num_src = 0;
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

HYDRA_DECLARE_KERNEL(gather_rows, GatherRowsParams)
HYDRA_DECLARE_KERNEL(scatter_add_rows, ScatterAddRowsParams)
HYDRA_DECLARE_KERNEL(gather_sum_rows, GatherSumRowsParams)
HYDRA_DECLARE_KERNEL(axis_gather, AxisIndexParams)
HYDRA_DECLARE_KERNEL(axis_scatter_add, AxisIndexParams)

}  // namespace hydra::kernels

namespace hydra::kernels::cuda {
size_t scatter_add_rows_workspace(const ScatterAddRowsParams& p);
}  // namespace hydra::kernels::cuda
