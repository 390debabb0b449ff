#include "model/attention.h"

#include <cmath>

#include "parallel/sequence.h"

namespace hydra::model {

SparseGlobalAttention::SparseGlobalAttention(Init& init, int64_t d, int64_t heads,
                                             AttentionPattern pattern, double rope_theta,
                                             double init_std, double out_std)
    : heads_(heads), head_dim_(d / heads), pattern_(pattern), rope_theta_(rope_theta) {
  qkv = register_module("qkv", std::make_shared<Linear>(init, d, 3 * d, init_std));
  out = register_module("out", std::make_shared<Linear>(init, d, d, out_std));
}

Tensor SparseGlobalAttention::forward(const Tensor& x, int64_t pos0,
                                      parallel::Communicator* sp) const {
  const int64_t B = x.size(0), L = x.size(1);
  const Tensor qkv5 = qkv->forward(x).view({B, L, 3, heads_, head_dim_});
  const auto parts = split(qkv5, {1, 1, 1}, 2);
  const Tensor q = rope(parts[0].squeeze(2), pos0, rope_theta_);
  const Tensor k = rope(parts[1].squeeze(2), pos0, rope_theta_);
  const Tensor v = parts[2].squeeze(2);
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim_));
  const Tensor a = sp != nullptr ? parallel::sparse_attention(*sp, q, k, v, pattern_, scale, pos0)
                                 : sparse_attention(q, k, v, pattern_, scale, pos0, pos0);
  return out->forward(a.view({B, L, heads_ * head_dim_}));
}

}  // namespace hydra::model
