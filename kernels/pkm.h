// The product-key memory's kernels: the embedding bag (PKM's value read: a weighted sum of table
// rows per token) with both gradients, and the product-key indices (the cells of the two halves'
// top-k keys). CPU: kernels/cpu/pkm.cpp; CUDA: kernels/cuda/pkm.cu.
#pragma once

#include "kernels/base/kernel.h"

namespace hydra::kernels {

// Weighted bag of rows (PKM's value read): out[t, :] = sum_k w[t, k] * table[index[t, k], :].
struct EmbeddingBagParams {
  DType dtype = DType::kF32;
  DType index_dtype = DType::kI64;
  const void* table = nullptr;    // [num_rows, cols]
  const void* index = nullptr;    // [n, m]
  const void* weights = nullptr;  // [n, m]
  void* out = nullptr;            // [n, cols]
  int64_t n = 0, m = 0, num_rows = 0, cols = 0;
  void* workspace = nullptr;  // CUDA: embedding_bag_fwd_workspace(p) bytes (the dense form's)
  void* stream = nullptr;
};

// gw[t, k] = <gout[t, :], table[index[t, k], :]>;
// gtable[r, :] = the sum of w[t, k] * gout[t, :] over the (t, k) with index[t, k] = r, in (t, k)
// order (zero for rows no index names), and hits[r] = whether any does: the table's gradient summed
// per row, never as one row per lookup.
struct EmbeddingBagBwdParams {
  EmbeddingBagParams fwd;
  const void* gout = nullptr;  // [n, cols]
  void* gweights = nullptr;    // [n, m] or null
  void* gtable = nullptr;      // [num_rows, cols] or null
  void* hits = nullptr;        // [num_rows] i32 or null (needs gtable)
  void* workspace =
      nullptr;  // CUDA: embedding_bag_bwd_workspace(p) bytes (the sort of the indices)
};

// Product-key indices (PKM): for each of `rows` rows, out[r, j] = a[r, c / k] * n_keys + b[r, c %
// k] with c = pick[r, j] (or cells[pick[r, j]] when `cells` is given: the pick names one of a
// list of cells): the j-th chosen cell of the k x k grid of the two halves' top-k keys.
struct ProductKeyParams {
  const int64_t* a = nullptr;      // [rows, k]
  const int64_t* b = nullptr;      // [rows, k]
  const int64_t* pick = nullptr;   // [rows, count], cells of the k x k grid (or places in cells)
  const int64_t* cells = nullptr;  // [num_cells] or null
  int64_t num_cells = 0;
  int64_t* out = nullptr;  // [rows, count]
  int64_t rows = 0, k = 0, count = 0, n_keys = 0;
  void* stream = nullptr;
};

HYDRA_DECLARE_KERNEL(product_key_indices, ProductKeyParams)

HYDRA_DECLARE_KERNEL(embedding_bag_fwd, EmbeddingBagParams)
HYDRA_DECLARE_KERNEL(embedding_bag_bwd, EmbeddingBagBwdParams)

namespace cuda {
// The dense form on CUDA: for a table of few rows against the lookups per bag (num_rows <= 64 m,
// m <= 256, as PKM's toy table of 4096 rows with 128 lookups a token), the bags as a matrix S [n,
// num_rows] (S[t, r] = the sum of token t's weights on row r, summed in lookup order) and the bag,
// its table gradient and the weights' gradient as GEMMs on the tensor cores: out = S table, gtable
// = S^T gout, gw[t, k] = (gout table^T)[t, index[t, k]]. Otherwise, and on the CPU, the sums row by
// row.
bool embedding_bag_dense(const EmbeddingBagParams& p);
size_t embedding_bag_fwd_workspace(const EmbeddingBagParams& p);
size_t embedding_bag_bwd_workspace(const EmbeddingBagBwdParams& p);
}  // namespace cuda

}  // namespace hydra::kernels
