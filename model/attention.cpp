#include "model/attention.h"

#include <cmath>
#include <vector>

#include "parallel/sequence.h"

namespace hydra::model {

SparseGlobalAttention::SparseGlobalAttention(Init& init, int64_t d, int64_t heads,
                                             AttentionPattern pattern, double rope_theta,
                                             double init_std, double out_std)
    : heads_(heads), head_dim_(d / heads), pattern_(pattern), rope_theta_(rope_theta) {
  qkv = register_module("qkv", std::make_shared<Linear>(init, d, 3 * d, init_std));
  out = register_module("out", std::make_shared<Linear>(init, d, d, out_std));
}

namespace {

// Dense causal attention of one query q [1, 1, H, dh] over the first n keys of k, v
// [1, >= n, H, dh] (all before it): the first P = n / part * part keys as P batch rows of `part`
// keys (a contiguous view; the query sees them all, so their positions need not be told), the rest
// as one more launch, merged by log-sum-exp.
Tensor split_attention(const Tensor& q, const Tensor& k, const Tensor& v, int64_t n, int64_t part,
                       double scale) {
  const int64_t H = q.size(2), dh = q.size(3), P = n / part, rest = n - P * part;
  const AttentionPattern dense{0, 0};
  const Tensor qp = q.expand({P, 1, H, dh});
  auto [o, lse] = sparse_attention_with_lse(qp, k.narrow(1, 0, P * part).view({P, part, H, dh}),
                                            v.narrow(1, 0, P * part).view({P, part, H, dh}), dense,
                                            scale, part, 0);  // o [P, 1, H, dh], lse [P, H, 1]
  Tensor outs = o.view({P, 1, 1, H, dh}), lses = lse.view({P, 1, H, 1});
  if (rest > 0) {
    auto [ro, rl] = sparse_attention_with_lse(
        q, k.narrow(1, P * part, rest), v.narrow(1, P * part, rest), dense, scale, n, P * part);
    outs = concat({outs, ro.view({1, 1, 1, H, dh})}, 0);
    lses = concat({lses, rl.view({1, 1, H, 1})}, 0);
  }
  return merge_attention(outs, lses).first;  // [1, 1, H, dh]
}

}  // namespace

std::array<Tensor, 3> SparseGlobalAttention::project(const Tensor& x, int64_t pos0) const {
  const int64_t B = x.size(0), L = x.size(1);
  const Tensor qkv5 = qkv->forward(x).view({B, L, 3, heads_, head_dim_});
  const auto parts = split(qkv5, {1, 1, 1}, 2);
  return {rope(parts[0].squeeze(2), pos0, rope_theta_),
          rope(parts[1].squeeze(2), pos0, rope_theta_), parts[2].squeeze(2)};
}

Tensor SparseGlobalAttention::forward(const Tensor& x, int64_t pos0,
                                      parallel::Communicator* sp) const {
  const int64_t B = x.size(0), L = x.size(1);
  const auto [q, k, v] = project(x, pos0);
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim_));
  const Tensor a = sp != nullptr ? parallel::sparse_attention(*sp, q, k, v, pattern_, scale, pos0)
                                 : sparse_attention(q, k, v, pattern_, scale, pos0, pos0);
  return out->forward(a.view({B, L, heads_ * head_dim_}));
}

Tensor SparseGlobalAttention::forward_cached(const Tensor& x, KvCache& cache) const {
  const int64_t B = x.size(0), L = x.size(1), pos0 = cache.len, end = pos0 + L;
  HYDRA_CHECK(end <= cache.capacity)
      << "attention: decoding position " << end << " is past the cache's " << cache.capacity;
  if (!cache.k.defined() || cache.k.dtype() != x.dtype()) {
    HYDRA_CHECK(pos0 == 0) << "attention: the cache's dtype changed mid-sequence";
    cache.k = Tensor::empty({B, cache.capacity, heads_, head_dim_}, x.dtype(), x.device());
    cache.v = Tensor::empty({B, cache.capacity, heads_, head_dim_}, x.dtype(), x.device());
  }
  const auto [q, k, v] = project(x, pos0);
  cache.k.narrow(1, pos0, L).copy_(k);
  cache.v.narrow(1, pos0, L).copy_(v);
  cache.len = end;
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim_));
  // One sequence at a time: a sequence's slice of the cache is rows the kernel reads in place
  // (the batch's slices are `capacity` rows apart, which the kernel's layout cannot express).
  std::vector<Tensor> outs;
  for (int64_t b = 0; b < B; ++b) {
    const Tensor qb = q.narrow(0, b, 1), kb = cache.k.narrow(0, b, 1), vb = cache.v.narrow(0, b, 1);
    const bool dense = pattern_.window <= 0 && pattern_.global_stride <= 0;
    outs.push_back(dense && L == 1 && end > cache.split
                       ? split_attention(qb, kb, vb, end, cache.split, scale)
                       : sparse_attention(qb, kb.narrow(1, 0, end), vb.narrow(1, 0, end), pattern_,
                                          scale, pos0, 0));
  }
  const Tensor a = B == 1 ? outs[0] : concat(outs, 0);
  return out->forward(a.view({B, L, heads_ * head_dim_}));
}

}  // namespace hydra::model
