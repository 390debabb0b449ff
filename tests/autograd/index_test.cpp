#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>

#include "autograd/ops.h"
#include "tests/test_util.h"

namespace hydra {
namespace {

using testing::randidx;
using testing::randn64;

TEST(Embedding, MatchesReferenceAtOddShape) {
  Tensor w = randn64({13, 5}, 1, 1.0, false);
  Tensor idx = randidx(13, {7, 3}, 2);
  Tensor y = embedding(w, idx);
  EXPECT_EQ(y.shape(), (Shape{7, 3, 5}));
  const auto wv = w.to_vector<double>(), yv = y.to_vector<double>();
  const auto iv = idx.to_vector<int64_t>();
  for (int i = 0; i < 21; ++i)
    for (int j = 0; j < 5; ++j) EXPECT_EQ(yv[i * 5 + j], wv[iv[i] * 5 + j]);
}

TEST(Embedding, GradcheckFloat64WithRepeatedIndices) {
  Tensor w = randn64({6, 4}, 3);
  Tensor idx = tensor<int64_t>({1, 3, 1, 5, 1, 0, 3}, {7});  // rows 1 and 3 repeat: gradients add
  HYDRA_EXPECT_GRADCHECK(
      [&](const std::vector<Tensor>& in) { return std::vector<Tensor>{embedding(in[0], idx)}; },
      (std::vector<Tensor>{w}));
}

TEST(Embedding, OutOfRangeIndexIsAnError) {
  try {
    (void)embedding(randn64({4, 2}, 4, 1.0, false), tensor<int64_t>({0, 4}, {2}));
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("index 4"), std::string::npos) << e.what();
  }
}

TEST(ScatterAddRows, MatchesReferenceAndGradcheckFloat64) {
  Tensor table = randn64({7, 5}, 5), src = randn64({13, 5}, 6);
  Tensor idx = randidx(7, {13}, 7);
  const auto tv = table.to_vector<double>(), sv = src.to_vector<double>();
  auto ref = tv;
  const auto iv = idx.to_vector<int64_t>();
  for (int i = 0; i < 13; ++i)
    for (int j = 0; j < 5; ++j) ref[iv[i] * 5 + j] += sv[i * 5 + j];
  const auto got = scatter_add_rows(table, idx, src).to_vector<double>();
  for (std::size_t i = 0; i < ref.size(); ++i) EXPECT_NEAR(got[i], ref[i], 1e-12);
  Tensor small_idx = tensor<int64_t>({3, 0, 3, 1, 3, 2}, {6});
  HYDRA_EXPECT_GRADCHECK(
      [&](const std::vector<Tensor>& in) {
        return std::vector<Tensor>{scatter_add_rows(in[0], small_idx, in[1])};
      },
      (std::vector<Tensor>{randn64({4, 3}, 8), randn64({6, 3}, 9)}));
}

TEST(GatherRows, GradcheckFloat64) {
  Tensor idx = tensor<int32_t>({2, 0, 2}, {3});
  HYDRA_EXPECT_GRADCHECK(
      [&](const std::vector<Tensor>& in) { return std::vector<Tensor>{gather_rows(in[0], idx)}; },
      (std::vector<Tensor>{randn64({3, 4}, 10)}));
}

// An index with repeats and rows no one names, and its inverse (ascending positions, -1 padded).
struct IndexWithInverse {
  Tensor index, inverse;
};
IndexWithInverse index_with_inverse(const std::vector<int64_t>& idx, int64_t rows, int64_t K) {
  std::vector<int64_t> inv(rows * K, -1), filled(rows, 0);
  for (std::size_t i = 0; i < idx.size(); ++i) inv[idx[i] * K + filled[idx[i]]++] = int64_t(i);
  return {tensor(idx, {static_cast<int64_t>(idx.size())}), tensor(inv, {rows, K})};
}

TEST(GatherSumRows, EqualsScatterAddIntoZerosAndGradcheckFloat64) {
  // Row 0 named 3 times, row 2 twice, rows 1 and 4 never; K = 3.
  const IndexWithInverse ii = index_with_inverse({0, 3, 2, 0, 2, 0, 5}, 6, 3);
  const Tensor src = randn64({7, 5}, 13, 1.0, false);
  const auto ref = scatter_add_rows(zeros({6, 5}, DType::kF64), ii.index, src).to_vector<double>();
  const auto got = gather_sum_rows(src, ii.inverse, ii.index).to_vector<double>();
  ASSERT_EQ(got.size(), ref.size());
  for (std::size_t i = 0; i < ref.size(); ++i) EXPECT_NEAR(got[i], ref[i], 1e-12) << i;
  HYDRA_EXPECT_GRADCHECK(
      [&](const std::vector<Tensor>& in) {
        return std::vector<Tensor>{gather_sum_rows(in[0], ii.inverse, ii.index)};
      },
      (std::vector<Tensor>{randn64({7, 4}, 14)}));
  HYDRA_EXPECT_GRADCHECK(
      [&](const std::vector<Tensor>& in) {
        return std::vector<Tensor>{gather_rows(in[0], ii.index, ii.inverse)};
      },
      (std::vector<Tensor>{randn64({6, 4}, 15)}));
  // Read through a view by both gathers and squared as well: their backwards add into the table's
  // gradient summed so far (gradient_sum_target through the view).
  HYDRA_EXPECT_GRADCHECK(
      [&](const std::vector<Tensor>& in) {
        return std::vector<Tensor>{gather_rows(in[0].view({6, 4}), ii.index, ii.inverse),
                                   gather_rows(in[1].view({6, 4}), ii.index), mul(in[0], in[1])};
      },
      (std::vector<Tensor>{randn64({2, 3, 4}, 18), randn64({2, 3, 4}, 19)}));
  // Its forward equals gather_rows without the inverse; a bad inverse is refused by name.
  const Tensor t = randn64({6, 3}, 16, 1.0, false);
  EXPECT_EQ(gather_rows(t, ii.index, ii.inverse).to_vector<double>(),
            gather_rows(t, ii.index).to_vector<double>());
  EXPECT_THROW((void)gather_sum_rows(src, ii.inverse.narrow(0, 0, 5).to(DType::kI32), ii.index),
               Error);
  const Tensor bad = tensor<int64_t>({0, 7, -1, -1}, {2, 2});
  try {
    (void)gather_sum_rows(randn64({2, 3}, 17, 1.0, false), bad, tensor<int64_t>({0, 0}, {2}));
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("gather_sum_rows: index 7"), std::string::npos)
        << e.what();
  }
}

TEST(Gather, MatchesReferenceAtOddShape) {
  Tensor x = randn64({7, 13, 5}, 11, 1.0, false);
  Tensor idx = randidx(13, {7, 4, 5}, 12);
  const auto xv = x.to_vector<double>(), got = gather(x, 1, idx).to_vector<double>();
  const auto iv = idx.to_vector<int64_t>();
  for (int i = 0; i < 7; ++i)
    for (int j = 0; j < 4; ++j)
      for (int k = 0; k < 5; ++k) {
        const int64_t q = (i * 4 + j) * 5 + k;
        EXPECT_EQ(got[q], xv[(i * 13 + iv[q]) * 5 + k]);
      }
}

TEST(Gather, GradcheckFloat64) {
  Tensor idx = randidx(4, {3, 6}, 13);
  HYDRA_EXPECT_GRADCHECK(
      [&](const std::vector<Tensor>& in) { return std::vector<Tensor>{gather(in[0], -1, idx)}; },
      (std::vector<Tensor>{randn64({3, 4}, 14)}));
}

TEST(ScatterAdd, MatchesReferenceAtOddShape) {
  Tensor x = randn64({7, 13, 5}, 15, 1.0, false), src = randn64({7, 9, 5}, 16, 1.0, false);
  Tensor idx = randidx(13, {7, 9, 5}, 17);
  auto ref = x.to_vector<double>();
  const auto sv = src.to_vector<double>();
  const auto iv = idx.to_vector<int64_t>();
  for (int i = 0; i < 7; ++i)
    for (int j = 0; j < 9; ++j)
      for (int k = 0; k < 5; ++k) {
        const int64_t q = (i * 9 + j) * 5 + k;
        ref[(i * 13 + iv[q]) * 5 + k] += sv[q];
      }
  const auto got = scatter_add(x, 1, idx, src).to_vector<double>();
  for (std::size_t i = 0; i < ref.size(); ++i) EXPECT_NEAR(got[i], ref[i], 1e-12);
}

TEST(ScatterAdd, GradcheckFloat64) {
  Tensor idx = randidx(3, {5, 2}, 18);
  HYDRA_EXPECT_GRADCHECK(
      [&](const std::vector<Tensor>& in) {
        return std::vector<Tensor>{scatter_add(in[0], 0, idx, in[1])};
      },
      (std::vector<Tensor>{randn64({3, 2}, 19), randn64({5, 2}, 20)}));
}

TEST(Concat, MatchesReferenceAtOddShapeAndGradcheckFloat64) {
  Tensor a = randn64({7, 3, 5}, 21), b = randn64({7, 10, 5}, 22);
  Tensor c = concat({a, b}, 1);
  EXPECT_EQ(c.shape(), (Shape{7, 13, 5}));
  const auto cv = c.to_vector<double>(), av = a.to_vector<double>(), bv = b.to_vector<double>();
  for (int i = 0; i < 7; ++i)
    for (int j = 0; j < 13; ++j)
      for (int k = 0; k < 5; ++k)
        EXPECT_EQ(cv[(i * 13 + j) * 5 + k],
                  j < 3 ? av[(i * 3 + j) * 5 + k] : bv[(i * 10 + j - 3) * 5 + k]);
  HYDRA_EXPECT_GRADCHECK(
      [](const std::vector<Tensor>& in) { return std::vector<Tensor>{concat(in, -1)}; },
      (std::vector<Tensor>{randn64({2, 3}, 23), randn64({2, 1}, 24), randn64({2, 2}, 25)}));
}

TEST(Split, ViewsAndGradcheckFloat64) {
  Tensor x = randn64({7, 13}, 26);
  auto parts = split(x, {3, 6, 4}, 1);
  ASSERT_EQ(parts.size(), 3u);
  EXPECT_EQ(parts[1].shape(), (Shape{7, 6}));
  EXPECT_EQ(parts[1].storage().get(), x.storage().get());
  HYDRA_EXPECT_GRADCHECK(
      [](const std::vector<Tensor>& in) {
        auto p = split(in[0], {1, 3, 2}, 0);
        return std::vector<Tensor>{mul(p[0], p[2].slice(0, 0, 1)), exp(p[1])};
      },
      (std::vector<Tensor>{randn64({6, 2}, 27)}));
  EXPECT_THROW(split(x, {3, 3}, 1), Error);
}

TEST(Topk, MatchesSortAtOddShape) {
  Tensor x = randn64({7, 13}, 28, 1.0, false);
  auto [values, indices] = topk(x, 5);
  const auto xv = x.to_vector<double>(), vv = values.to_vector<double>();
  const auto iv = indices.to_vector<int64_t>();
  for (int r = 0; r < 7; ++r) {
    std::vector<int64_t> order(13);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return xv[r * 13 + a] > xv[r * 13 + b]; });
    for (int j = 0; j < 5; ++j) {
      EXPECT_EQ(iv[r * 5 + j], order[j]);
      EXPECT_EQ(vv[r * 5 + j], xv[r * 13 + order[j]]);
    }
  }
}

TEST(Topk, TiesGoToTheLowerIndex) {
  auto [values, indices] = topk(tensor<double>({1, 3, 3, 2, 3}, {5}), 3);
  EXPECT_EQ(indices.to_vector<int64_t>(), (std::vector<int64_t>{1, 2, 4}));
}

TEST(Topk, GradcheckFloat64) {
  HYDRA_EXPECT_GRADCHECK(
      [](const std::vector<Tensor>& in) { return std::vector<Tensor>{topk(in[0], 3).first}; },
      (std::vector<Tensor>{randn64({4, 7}, 29)}));
}

}  // namespace
}  // namespace hydra

namespace hydra {
namespace {

// The routing reference worked by hand: a tie in r goes to the lower expert, the walk stops at the
// first expert whose s is 0, the capacity keeps the first chunks in order, and the dispatch order
// is expert-major, chunk by chunk, token by token.
TEST(MoeRoute, ChoosesAndOrdersAsWorkedByHand) {
  const Tensor r =
      tensor(std::vector<float>{0.5f, 0.5f, 0.1f, 0.9f, 0.2f, 0.3f, 0.1f, 0.2f, 0.3f}, {3, 3});
  const Tensor s = tensor(std::vector<float>{1, 1, 1, 1, 0, 1, 0, 0, 0}, {3, 3});
  const MoeDispatch d =
      moe_route(r, s, /*batch=*/1, /*chunk_len=*/2, /*max_active=*/2, /*capacity=*/0);
  EXPECT_EQ(d.mask.to_vector<float>(), (std::vector<float>{1, 1, 0, 1, 0, 1, 0, 0, 0}));
  EXPECT_EQ(d.counts, (std::vector<int64_t>{2, 1, 1}));
  EXPECT_EQ(d.dropped, (std::vector<int64_t>{0, 0, 0}));
  EXPECT_EQ(d.perm.to_vector<int64_t>(), (std::vector<int64_t>{0, 1, 2, 3, 0, 1, 2, 3}));
  EXPECT_EQ(d.widx.to_vector<int64_t>(), (std::vector<int64_t>{0, 0, 3, 3, 1, 1, 5, 5}));
  const MoeDispatch c = moe_route(r, s, 1, 2, 2, /*capacity=*/1);
  EXPECT_EQ(c.counts, (std::vector<int64_t>{1, 1, 1}));
  EXPECT_EQ(c.dropped, (std::vector<int64_t>{1, 0, 0}));
  EXPECT_EQ(c.mask.to_vector<float>(), (std::vector<float>{1, 1, 0, 0, 0, 1, 0, 0, 0}));
  EXPECT_EQ(c.perm.to_vector<int64_t>(), (std::vector<int64_t>{0, 1, 0, 1, 2, 3}));
  EXPECT_EQ(c.widx.to_vector<int64_t>(), (std::vector<int64_t>{0, 0, 1, 1, 5, 5}));
  // Two sequences of 3 chunks: the second's tokens start at L = 6.
  const Tensor r2 = concat({r, r}, 0), s2 = concat({s, s}, 0);
  const MoeDispatch b = moe_route(r2, s2, /*batch=*/2, 2, 1, 0);
  EXPECT_EQ(b.counts, (std::vector<int64_t>{4, 0, 0}));
  EXPECT_EQ(b.perm.to_vector<int64_t>(), (std::vector<int64_t>{0, 1, 2, 3, 6, 7, 8, 9}));
  EXPECT_EQ(b.widx.to_vector<int64_t>(), (std::vector<int64_t>{0, 0, 3, 3, 9, 9, 12, 12}));
  // The inverse: each token's dispatch positions, ascending, -1 where fewer experts took it.
  EXPECT_EQ(d.inverse.shape(), (Shape{6, 2}));
  EXPECT_EQ(d.inverse.to_vector<int64_t>(),
            (std::vector<int64_t>{0, 4, 1, 5, 2, 6, 3, 7, -1, -1, -1, -1}));
  EXPECT_EQ(c.inverse.to_vector<int64_t>(),
            (std::vector<int64_t>{0, 2, 1, 3, 4, -1, 5, -1, -1, -1, -1, -1}));
  EXPECT_EQ(b.inverse.shape(), (Shape{12, 1}));
  EXPECT_EQ(b.inverse.to_vector<int64_t>(),
            (std::vector<int64_t>{0, 1, 2, 3, -1, -1, 4, 5, 6, 7, -1, -1}));
}

// The tiled order holds the packed order's groups, each starting at a multiple of the tile; the
// rest is padding (token 0, the pair one past the last); the inverse points at the same tokens.
TEST(MoeRoute, TiledOrderIsThePackedOrderWithGroupsOnTileBoundaries) {
  Generator g(41);
  const int64_t batch = 2, chunks = 7, E = 4, c = 3, tile = 4;
  const Tensor raw = randn({batch * chunks, E}, g);
  const Tensor r = raw, s = relu(raw);
  const MoeDispatch packed = moe_route(r, s, batch, c, 2, 0);
  const MoeDispatch tiled = moe_route(r, s, batch, c, 2, 0, tile);
  ASSERT_TRUE(tiled.counts.empty());
  const std::vector<int64_t> host = tiled.host_counts->get();
  EXPECT_EQ(std::vector<int64_t>(host.begin(), host.begin() + E), packed.counts);
  const auto pp = packed.perm.to_vector<int64_t>(), pw = packed.widx.to_vector<int64_t>();
  const auto tp = tiled.perm.to_vector<int64_t>(), tw = tiled.widx.to_vector<int64_t>();
  const auto tiles = tiled.tiles.to_vector<int64_t>();
  // Slots: 2 * 7 * 2 * 3 = 84 packed, rounded up to 21 tiles, plus one tile per expert.
  EXPECT_EQ(tp.size(), size_t((21 + E) * tile));
  EXPECT_EQ(tiles.size(), size_t(21 + E));
  std::vector<int64_t> tiled_pos(pp.size());  // packed position -> tiled position
  int64_t from = 0, at = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t rows = packed.counts[e] * c, padded = (rows + tile - 1) / tile * tile;
    for (int64_t i = 0; i < padded; ++i) {
      if (i < rows) {
        EXPECT_EQ(tp[at + i], pp[from + i]) << "expert " << e << " row " << i;
        EXPECT_EQ(tw[at + i], pw[from + i]) << "expert " << e << " row " << i;
        tiled_pos[from + i] = at + i;
      } else {
        EXPECT_EQ(tp[at + i], 0);
        EXPECT_EQ(tw[at + i], batch * chunks * E);
      }
    }
    for (int64_t t = at / tile; t < (at + padded) / tile; ++t) EXPECT_EQ(tiles[t], e) << t;
    from += rows;
    at += padded;
  }
  for (int64_t t = at / tile; t < int64_t(tiles.size()); ++t) EXPECT_EQ(tiles[t], -1) << t;
  for (size_t i = at; i < tp.size(); ++i) EXPECT_EQ(tp[i], 0);
  const auto pinv = packed.inverse.to_vector<int64_t>(), tinv = tiled.inverse.to_vector<int64_t>();
  ASSERT_EQ(pinv.size(), tinv.size());
  for (size_t i = 0; i < pinv.size(); ++i)
    EXPECT_EQ(tinv[i], pinv[i] < 0 ? -1 : tiled_pos[pinv[i]]) << i;
}

// The MoE's fused combine equals the composed ops it replaces (the weights gathered by dispatch
// row, a multiply, the token-order gather-sum), values and gradients, on a real routing: packed
// with a capacity that drops chunks, and tiled (padding rows); and passes a float64 gradcheck.
TEST(MoeCombine, EqualsTheComposedOpsAndGradcheckFloat64) {
  const int64_t batch = 2, chunks = 5, E = 4, c = 3, C = 7, pairs = batch * chunks * E;
  Generator g(51);
  const Tensor raw = randn({batch * chunks, E}, g, 0.0, 1.0, DType::kF64);
  const Tensor r = raw, s = relu(raw);
  for (const int64_t tile : {int64_t{0}, int64_t{4}}) {
    const MoeDispatch d = moe_route(r, s, batch, c, 2, tile > 0 ? 0 : 2, tile);
    const int64_t rows = d.perm.numel();
    ASSERT_GT(rows, 0);
    const Tensor perm = d.perm, widx = d.widx;
    const Tensor y0 = randn64({rows, C}, 52, 1.0, false), w0 = randn64({pairs}, 53, 1.0, false);
    auto composed = [&](const Tensor& y, const Tensor& w) {
      const Tensor wt = concat({w.reshape({pairs, 1}), zeros({1, 1}, DType::kF64)}, 0);
      return gather_sum_rows(mul(y, gather_rows(wt, widx)), d.inverse, perm);
    };
    auto fused = [&](const Tensor& y, const Tensor& w) {
      return moe_combine(y, w, d.inverse, widx, perm, E, c);
    };
    std::vector<std::vector<double>> values, gy, gw;
    for (const bool use_fused : {true, false}) {
      Tensor y = y0.clone(), w = w0.clone();
      y.set_requires_grad(true);
      w.set_requires_grad(true);
      const Tensor out = use_fused ? fused(y, w) : composed(y, w);
      values.push_back(out.to_vector<double>());
      sum(mul(out, randn64(out.shape(), 54, 1.0, false))).backward();
      gy.push_back(y.grad().to_vector<double>());
      gw.push_back(w.grad().to_vector<double>());
    }
    for (std::size_t i = 0; i < values[0].size(); ++i)
      ASSERT_NEAR(values[0][i], values[1][i], 1e-12) << "tile " << tile << " value " << i;
    for (std::size_t i = 0; i < gy[0].size(); ++i)
      ASSERT_NEAR(gy[0][i], gy[1][i], 1e-12) << "tile " << tile << " gy " << i;
    for (std::size_t i = 0; i < gw[0].size(); ++i)
      ASSERT_NEAR(gw[0][i], gw[1][i], 1e-12) << "tile " << tile << " gw " << i;
    HYDRA_EXPECT_GRADCHECK(
        [&](const std::vector<Tensor>& in) { return std::vector<Tensor>{fused(in[0], in[1])}; },
        (std::vector<Tensor>{randn64({rows, C}, 55), randn64({pairs}, 56)}));
  }
  EXPECT_THROW((void)moe_combine(randn64({4, 3}, 57, 1.0, false), randn64({pairs}, 58, 1.0, false),
                                 zeros({7, 2}, DType::kI64), zeros({4}, DType::kI64),
                                 zeros({4}, DType::kI64), E, c),
               Error);  // 7 tokens are not 10 chunks of 3
}

}  // namespace
}  // namespace hydra
