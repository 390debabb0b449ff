// Product-key memory (hydra.md section 6; Lample et al. 2019). Per head: q = RMSNorm(W_q x) split
// in halves q1, q2; the top-k sub-keys of each half by inner product; the k x k candidate sums; the
// top-k of those; softmax over their scores; out = sum over heads and picks of weight * V[index],
// with index = i1 * n + i2. Values (n^2 x d) get row-sparse gradients and their own learning rate.
#pragma once

#include "model/context.h"
#include "model/layers.h"
#include "model/spec.h"

namespace hydra::model {

// The product-key search for queries q1, q2 [H, T, half] over sub-keys k1, k2 [H, n, half]: for
// each (head, query) the k best full keys, as scores [H, T, k] (differentiable) and value indices
// i1 * n + i2 (i64 [H, T, k]).
struct PkmLookup {
  Tensor scores;
  Tensor indices;
};
// The cells of the k x k grid the search considers (those that can be among its k best) and the
// 0/1 matrix that forms their sums from the halves' top-k scores, on a device in a dtype.
struct PkmCells {
  Tensor select;  // [2k, P]
  Tensor cells;   // [P] i64
};
PkmCells pkm_cells(int64_t topk, DType dtype, Device device);
// `cache` (optional) keeps pkm_cells for the next call; remade when its dtype or device differs.
PkmLookup pkm_lookup(const Tensor& q1, const Tensor& q2, const Tensor& k1, const Tensor& k2,
                     int64_t topk, PkmCells* cache = nullptr);

class ProductKeyMemory : public Module {
 public:
  ProductKeyMemory(Init& init, const ModelSpec& spec, int64_t index);
  // x [B, L, d] (normalised) -> [B, L, d].
  Tensor forward(const Tensor& x, ForwardContext& ctx) const;

  std::shared_ptr<Linear> query;  // [H * k_dim, d]
  Tensor query_norm;              // [k_dim]
  Tensor keys;                    // [H, 2, n, k_dim / 2]
  Tensor values;                  // [n^2, d], sparse gradient, lr group "pkm_values"

 private:
  int64_t index_, heads_, k_dim_, n_keys_, topk_;
  double eps_;
  mutable PkmCells cells_;  // pkm_lookup's cache
};

}  // namespace hydra::model
