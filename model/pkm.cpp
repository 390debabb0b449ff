#include "model/pkm.h"

#include <cmath>

#include "autograd/grad_mode.h"

namespace hydra::model {

PkmLookup pkm_lookup(const Tensor& q1, const Tensor& q2, const Tensor& k1, const Tensor& k2,
                     int64_t topk) {
  const int64_t H = q1.size(0), T = q1.size(1), n = k1.size(1), k = topk;
  const auto [v1, i1] = hydra::topk(matmul(q1, k1.transpose(1, 2)), k);  // [H, T, k]
  const auto [v2, i2] = hydra::topk(matmul(q2, k2.transpose(1, 2)), k);
  const Tensor cand = add(v1.unsqueeze(3), v2.unsqueeze(2)).reshape({H, T, k * k});
  const auto [scores, ci] = hydra::topk(cand, k);  // [H, T, k], ci indexes the k x k grid
  // index = i1[ci / k] * n + i2[ci % k]  (integer bookkeeping on the device, no gradient)
  return {scores, product_key_indices(i1, i2, ci, n)};
}

ProductKeyMemory::ProductKeyMemory(Init& init, const ModelSpec& spec, int64_t index)
    : index_(index),
      heads_(spec.pkm_heads),
      k_dim_(spec.pkm_k_dim),
      n_keys_(spec.pkm_n_keys),
      topk_(spec.pkm_topk),
      eps_(spec.norm_eps) {
  const int64_t d = spec.d, half = k_dim_ / 2;
  query =
      register_module("query", std::make_shared<Linear>(init, d, heads_ * k_dim_, spec.init_std));
  query_norm =
      register_parameter("query_norm", ones({k_dim_}), ParamOptions{.weight_decay = false});
  keys = register_parameter("keys",
                            init.normal({heads_, 2, n_keys_, half}, 1.0 / std::sqrt(double(half))));
  values = register_parameter(
      "values", init.normal({n_keys_ * n_keys_, d}, 1.0 / std::sqrt(double(d))),
      ParamOptions{.weight_decay = false, .lr_group = "pkm_values", .sparse_grad = true});
}

Tensor ProductKeyMemory::forward(const Tensor& x, ForwardContext& ctx) const {
  const int64_t B = x.size(0), L = x.size(1), d = x.size(2), T = B * L, H = heads_,
                half = k_dim_ / 2, k = topk_;
  const Tensor q =
      rms_norm(query->forward(x.reshape({T, d})).view({T, H, k_dim_}), query_norm, eps_);
  const auto qs = split(q.permute({1, 0, 2}), {half, half}, 2);  // [H, T, half] each
  const auto ks = split(keys, {1, 1}, 1);
  const PkmLookup look = pkm_lookup(qs[0], qs[1], ks[0].squeeze(1), ks[1].squeeze(1), k);
  const Tensor w = softmax(look.scores);  // [H, T, k]
  const Tensor out = embedding_bag(values, look.indices.permute({1, 0, 2}).reshape({T, H * k}),
                                   w.permute({1, 0, 2}).reshape({T, H * k}), /*sparse_grad=*/true);
  if (ctx.recording()) {  // on the device; two numbers and a row count per table row come back
    NoGradGuard no_grad;
    const std::string p = "pkm." + std::to_string(index_) + ".";
    const Tensor flat = look.indices.reshape({-1});
    const Tensor counts = scatter_add_rows(zeros({n_keys_ * n_keys_, 1}, DType::kF32, x.device()),
                                           flat, ones({flat.numel(), 1}, DType::kF32, x.device()));
    int64_t hit = 0;
    for (float c : counts.to_vector<float>()) hit += c > 0;
    ctx.stat(p + "value_coverage", double(hit) / double(n_keys_ * n_keys_));
    ctx.stat(p + "score_entropy", entropy_sum(w).item<double>() / double(H * T));
  }
  return out.view({B, L, d});
}

}  // namespace hydra::model
