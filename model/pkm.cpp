#include "model/pkm.h"

#include <cmath>

#include "autograd/grad_mode.h"

namespace hydra::model {

// Only the cells (i, j) of the k x k grid of sums v1[i] + v2[j] with (i + 1)(j + 1) <= k can be
// among its k best: the (i + 1)(j + 1) cells (i' <= i, j' <= j) are at least as large (both lists
// descend) and come first among equals (a lower cell), so a cell past the bound has k before it.
// The sums of those P cells (P = 119 of 1,024 at k = 32) come from [v1, v2] times a 0/1 matrix:
// each is 1 * v1[i] + 1 * v2[j], the same value, rounded once, as the grid's sum. The top-k over
// them, in cell order, picks what the full grid's top-k picks.
PkmCells pkm_cells(int64_t k, DType dtype, Device device) {
  std::vector<int64_t> cells;
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; (i + 1) * (j + 1) <= k; ++j) cells.push_back(i * k + j);
  const int64_t P = static_cast<int64_t>(cells.size());
  std::vector<double> pick(2 * k * P, 0.0);  // row i (v1) and row k + j (v2) of cell p
  for (int64_t p = 0; p < P; ++p) {
    pick[(cells[p] / k) * P + p] = 1.0;
    pick[(k + cells[p] % k) * P + p] = 1.0;
  }
  return {tensor(pick, {2 * k, P}).to(dtype).to(device), tensor(cells, {P}).to(device)};
}

PkmLookup pkm_lookup(const Tensor& q1, const Tensor& q2, const Tensor& k1, const Tensor& k2,
                     int64_t topk, PkmCells* cache) {
  const int64_t n = k1.size(1), k = topk;
  const auto [v1, i1] = hydra::topk(matmul(q1, k1.transpose(1, 2)), k);  // [H, T, k], descending
  const auto [v2, i2] = hydra::topk(matmul(q2, k2.transpose(1, 2)), k);
  PkmCells local;
  PkmCells& cells = cache ? *cache : local;
  if (!cells.select.defined() || cells.select.dtype() != v1.dtype() ||
      cells.select.device() != v1.device() || cells.select.size(0) != 2 * k)
    cells = pkm_cells(k, v1.dtype(), v1.device());
  const Tensor cand = matmul(concat({v1, v2}, 2), cells.select);  // [H, T, P]
  const auto [scores, ci] = hydra::topk(cand, k);                 // ci: places in cells
  // index = i1[c / k] * n + i2[c % k] with c = cells[ci] (integer bookkeeping on the device)
  return {scores, product_key_indices(i1, i2, ci, n, cells.cells)};
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
  const PkmLookup look = pkm_lookup(qs[0], qs[1], ks[0].squeeze(1), ks[1].squeeze(1), k, &cells_);
  const Tensor w = softmax(look.scores);  // [H, T, k]
  const Tensor out = embedding_bag(values, look.indices.permute({1, 0, 2}).reshape({T, H * k}),
                                   w.permute({1, 0, 2}).reshape({T, H * k}), /*sparse_grad=*/true);
  if (ctx.recording()) {  // on the device; two numbers and a row count per table row come back
    NoGradGuard no_grad;
    const std::string p = "pkm." + std::to_string(index_) + ".";
    const Tensor flat = look.indices.reshape({-1});
    const Tensor counts = scatter_add_rows(zeros({n_keys_ * n_keys_, 1}, DType::kF32, x.device()),
                                           flat, ones({flat.numel(), 1}, DType::kF32, x.device()));
    const double cells = double(n_keys_ * n_keys_), rows = double(H * T);
    ctx.stat_later({counts, entropy_sum(w)},
                   [p, cells, rows](const std::vector<Tensor>& h, ForwardContext& c) {
                     int64_t hit = 0;
                     for (float n : h[0].to_vector<float>()) hit += n > 0;
                     c.stat(p + "value_coverage", double(hit) / cells);
                     c.stat(p + "score_entropy", h[1].item<double>() / rows);
                   });
  }
  return out.view({B, L, d});
}

}  // namespace hydra::model
