#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "autograd/ops.h"
#include "tests/test_util.h"

namespace hydra {
namespace {

using testing::randn64;

bool is_global(int64_t pos, int64_t stride) { return stride > 0 && pos % stride == 0; }

// Naive reference: builds the full masked score matrix per (b, h).
std::vector<double> attention_ref(const Tensor& q, const Tensor& k, const Tensor& v,
                                  AttentionPattern pat, double scale, int64_t q_pos0 = 0,
                                  int64_t k_pos0 = 0) {
  const int64_t B = q.size(0), Lq = q.size(1), Lk = k.size(1), H = q.size(2), dh = q.size(3);
  const auto qv = q.to_vector<double>(), kv = k.to_vector<double>(), vv = v.to_vector<double>();
  std::vector<double> out(B * Lq * H * dh, 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < Lq; ++i) {
        const int64_t tq = q_pos0 + i;
        std::vector<double> s(Lk, -std::numeric_limits<double>::infinity());
        double mx = -std::numeric_limits<double>::infinity();
        for (int64_t j = 0; j < Lk; ++j) {
          const int64_t tk = k_pos0 + j;
          const bool vis =
              tk <= tq && (pat.window <= 0 || tq - tk < pat.window ||
                           is_global(tk, pat.global_stride) || is_global(tq, pat.global_stride));
          if (!vis) continue;
          double d = 0;
          for (int64_t c = 0; c < dh; ++c)
            d += qv[((b * Lq + i) * H + h) * dh + c] * kv[((b * Lk + j) * H + h) * dh + c];
          s[j] = d * scale;
          mx = std::max(mx, s[j]);
        }
        if (mx == -std::numeric_limits<double>::infinity()) continue;
        double z = 0;
        for (int64_t j = 0; j < Lk; ++j) z += std::exp(s[j] - mx);
        for (int64_t j = 0; j < Lk; ++j) {
          const double p = std::exp(s[j] - mx) / z;
          for (int64_t c = 0; c < dh; ++c)
            out[((b * Lq + i) * H + h) * dh + c] += p * vv[((b * Lk + j) * H + h) * dh + c];
        }
      }
  return out;
}

void expect_near_all(const std::vector<double>& got, const std::vector<double>& ref, double tol,
                     const char* what) {
  ASSERT_EQ(got.size(), ref.size());
  for (std::size_t i = 0; i < ref.size(); ++i)
    ASSERT_NEAR(got[i], ref[i], tol) << what << " at " << i;
}

TEST(SparseAttention, TiledEqualsNaiveMaskedReferenceAtOddShapes) {
  // Lengths past several 32-query tiles and 64-key blocks; windows and strides of odd sizes.
  const std::vector<AttentionPattern> patterns = {{0, 0},   {7, 0}, {13, 5},
                                                  {40, 16}, {1, 3}, {100, 50}};
  for (const auto& pat : patterns) {
    for (int64_t L : {1, 13, 77, 150}) {
      Tensor q = randn64({2, L, 3, 5}, 1, 1.0, false), k = randn64({2, L, 3, 5}, 2, 1.0, false),
             v = randn64({2, L, 3, 5}, 3, 1.0, false);
      expect_near_all(sparse_attention(q, k, v, pat, 0.4).to_vector<double>(),
                      attention_ref(q, k, v, pat, 0.4), 1e-12, "forward");
    }
  }
}

TEST(SparseAttention, DenseEqualsPlainCausalAttention) {
  // Plain causal attention written with the engine's own ops: softmax(QK^T * s + mask) V.
  const int64_t L = 37, H = 2, dh = 4;
  Tensor q = randn64({1, L, H, dh}, 4, 1.0, false), k = randn64({1, L, H, dh}, 5, 1.0, false),
         v = randn64({1, L, H, dh}, 6, 1.0, false);
  Tensor qh = q.permute({0, 2, 1, 3}), kh = k.permute({0, 2, 1, 3}), vh = v.permute({0, 2, 1, 3});
  Tensor scores = mul(matmul(qh, kh.transpose(2, 3)), 0.5);
  std::vector<double> mask(L * L);
  for (int64_t i = 0; i < L; ++i)
    for (int64_t j = 0; j < L; ++j) mask[i * L + j] = j <= i ? 0.0 : -1e30;
  Tensor plain = matmul(softmax(add(scores, tensor(mask, {L, L}))), vh).permute({0, 2, 1, 3});
  expect_near_all(sparse_attention(q, k, v, {0, 0}, 0.5).to_vector<double>(),
                  plain.to_vector<double>(), 1e-12, "dense");
}

TEST(SparseAttention, OffsetPositionsMatchTheWholeSequence) {
  // The last 20 queries of a 50-token sequence, attending to all its keys with q_pos0 = 30, equal
  // rows 30..49 of the whole computation (what a sequence-parallel shard does).
  const AttentionPattern pat{9, 8};
  Tensor q = randn64({1, 50, 2, 3}, 7, 1.0, false), k = randn64({1, 50, 2, 3}, 8, 1.0, false),
         v = randn64({1, 50, 2, 3}, 9, 1.0, false);
  const auto whole = sparse_attention(q, k, v, pat, 0.7).narrow(1, 30, 20).to_vector<double>();
  const auto shard =
      sparse_attention(q.narrow(1, 30, 20), k, v, pat, 0.7, 30, 0).to_vector<double>();
  expect_near_all(shard, whole, 1e-13, "shard");
}

TEST(SparseAttention, GradcheckFloat64) {
  for (const AttentionPattern& pat : {AttentionPattern{0, 0}, AttentionPattern{3, 4}}) {
    HYDRA_EXPECT_GRADCHECK(
        [&](const std::vector<Tensor>& in) {
          return std::vector<Tensor>{sparse_attention(in[0], in[1], in[2], pat, 0.6)};
        },
        (std::vector<Tensor>{randn64({2, 9, 2, 3}, 10), randn64({2, 9, 2, 3}, 11),
                             randn64({2, 9, 2, 3}, 12)}));
  }
}

// The log-sum-exp is differentiable too (partial attentions merged across sequence shards need it),
// also for queries placed after a separate block of keys.
TEST(SparseAttention, GradcheckFloat64WithLogSumExpOutput) {
  for (const auto& [pat, q0, k0] : {std::tuple{AttentionPattern{3, 4}, int64_t{0}, int64_t{0}},
                                    std::tuple{AttentionPattern{0, 0}, int64_t{20}, int64_t{2}}}) {
    HYDRA_EXPECT_GRADCHECK(
        [&](const std::vector<Tensor>& in) {
          auto [o, lse] = sparse_attention_with_lse(in[0], in[1], in[2], pat, 0.6, q0, k0);
          return std::vector<Tensor>{o, lse};
        },
        (std::vector<Tensor>{randn64({2, 7, 2, 3}, 14), randn64({2, 9, 2, 3}, 15),
                             randn64({2, 9, 2, 3}, 16)}));
  }
}

// Attention over keys split in three blocks, merged, is attention over all of them; so is its lse.
TEST(MergeAttention, PartsOverSplitKeysMergeToTheWhole) {
  const Tensor q = randn64({2, 7, 2, 4}, 20, 1.0, false),
               k = randn64({2, 11, 2, 4}, 21, 1.0, false),
               v = randn64({2, 11, 2, 4}, 22, 1.0, false);
  const AttentionPattern dense{0, 0};
  // Queries at positions 11..17 see every key (positions 0..10).
  const auto [want_o, want_l] = sparse_attention_with_lse(q, k, v, dense, 0.5, 11, 0);
  std::vector<Tensor> os, ls;
  for (const auto& [s0, n] : {std::pair<int64_t, int64_t>{0, 4}, {4, 6}, {10, 1}}) {
    auto [o, l] =
        sparse_attention_with_lse(q, k.narrow(1, s0, n), v.narrow(1, s0, n), dense, 0.5, 11, s0);
    os.push_back(o.unsqueeze(0));
    ls.push_back(l.unsqueeze(0));
  }
  const auto [o, l] = merge_attention(concat(os, 0), concat(ls, 0));
  EXPECT_LT(testing::rel_error(o, want_o), 1e-13);
  EXPECT_LT(testing::rel_error(l, want_l), 1e-13);
}

// Parts that saw no key (lse -inf) weigh nothing; a query no part saw gets out 0 and lse -inf.
TEST(MergeAttention, GradcheckFloat64WithEmptyParts) {
  const int64_t P = 3, B = 2, L = 5, H = 2, dh = 3;
  auto lse = randn64({P, B, H, L}, 31, 1.0, false).to_vector<double>();
  const double kNegInf = -std::numeric_limits<double>::infinity();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      lse[((1 * B + b) * H + h) * L + 1] = kNegInf;  // part 1 empty for query 1
      for (int64_t i = 0; i < P; ++i)
        lse[((i * B + b) * H + h) * L + 3] = kNegInf;  // query 3: no part
    }
  Tensor lses = tensor(lse, {P, B, H, L});
  lses.set_requires_grad(true);
  {
    const auto [o, l] = merge_attention(randn64({P, B, L, H, dh}, 30, 1.0, false), lses.detach());
    const auto ov = o.to_vector<double>(), lv = l.to_vector<double>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) {
        EXPECT_EQ(lv[(b * H + h) * L + 3], kNegInf);
        for (int64_t c = 0; c < dh; ++c) EXPECT_EQ(ov[((b * L + 3) * H + h) * dh + c], 0.0);
      }
  }
  // The lse output at query 3 is -inf (no finite difference): check the gradients through exp(lse).
  HYDRA_EXPECT_GRADCHECK(
      [](const std::vector<Tensor>& in) {
        auto [o, l] = merge_attention(in[0], in[1]);
        return std::vector<Tensor>{o, exp(l)};
      },
      (std::vector<Tensor>{randn64({P, B, L, H, dh}, 30), lses}));
}

TEST(SparseAttention, GradcheckFloat64ThroughStridedQkvSlices) {
  HYDRA_EXPECT_GRADCHECK(
      [](const std::vector<Tensor>& in) {
        Tensor qkv = in[0].reshape({1, 7, 3, 2, 4});
        return std::vector<Tensor>{
            sparse_attention(qkv.select(2, 0), qkv.select(2, 1), qkv.select(2, 2), {4, 3}, 0.5)};
      },
      (std::vector<Tensor>{randn64({1, 7, 24}, 13)}));
}

TEST(Rope, MatchesRotationAtOddShapeAndInverts) {
  Tensor x = randn64({2, 7, 3, 6}, 14, 1.0, false);
  const auto xv = x.to_vector<double>(), y = rope(x, 5, 100.0).to_vector<double>();
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t t = 0; t < 7; ++t)
      for (int64_t h = 0; h < 3; ++h)
        for (int64_t i = 0; i < 3; ++i) {
          const double ang = (5 + t) * std::pow(100.0, -2.0 * i / 6);
          const int64_t base = ((b * 7 + t) * 3 + h) * 6;
          EXPECT_NEAR(y[base + i], xv[base + i] * std::cos(ang) - xv[base + i + 3] * std::sin(ang),
                      1e-12);
          EXPECT_NEAR(y[base + i + 3],
                      xv[base + i] * std::sin(ang) + xv[base + i + 3] * std::cos(ang), 1e-12);
        }
}

TEST(Rope, GradcheckFloat64) {
  HYDRA_EXPECT_GRADCHECK(
      [](const std::vector<Tensor>& in) { return std::vector<Tensor>{rope(in[0], 3, 10000.0)}; },
      (std::vector<Tensor>{randn64({2, 5, 2, 4}, 15)}));
}

TEST(GroupedLinear, MatchesPerGroupLinearAndGradcheckFloat64) {
  Tensor x = randn64({13, 5}, 16, 1.0, false), w = randn64({3, 7, 5}, 17, 1.0, false);
  const std::vector<int64_t> sizes = {4, 0, 9};
  const auto got = grouped_linear(x, w, sizes).to_vector<double>();
  std::vector<double> ref;
  for (const auto& [row, n, g] :
       std::vector<std::tuple<int64_t, int64_t, int64_t>>{{0, 4, 0}, {4, 9, 2}}) {
    const auto part = linear(x.narrow(0, row, n), w.select(0, g)).to_vector<double>();
    ref.insert(ref.end(), part.begin(), part.end());
  }
  expect_near_all(got, ref, 1e-12, "grouped_linear");
  HYDRA_EXPECT_GRADCHECK(
      [&](const std::vector<Tensor>& in) {
        return std::vector<Tensor>{grouped_linear(in[0], in[1], {2, 0, 3})};
      },
      (std::vector<Tensor>{randn64({5, 4}, 18), randn64({3, 2, 4}, 19)}));
}

TEST(GroupedLinear, BlocksOfGroupsEqualTheExpertMajorOrderAndGradcheckFloat64) {
  // Rows as they arrive from 3 peers, each sending groups for 2 experts (some empty): the same as
  // gathering them into expert-major order first.
  Tensor x = randn64({11, 5}, 20), w = randn64({2, 3, 5}, 21);
  const std::vector<int64_t> blocks = {2, 1, 0, 3, 4, 1};  // [peer][expert]
  const Tensor y = grouped_linear(x, w, blocks);
  const std::vector<int64_t> order = {0, 1, 6, 7, 8, 9,
                                      2, 3, 4, 5, 10};  // expert 0's rows, then expert 1's
  const Tensor xe = gather_rows(x, tensor(order, {11}));
  const Tensor ye = grouped_linear(xe, w, {6, 5});
  expect_near_all(gather_rows(y, tensor(order, {11})).to_vector<double>(), ye.to_vector<double>(),
                  1e-12, "blocks");
  HYDRA_EXPECT_GRADCHECK(
      [&](const std::vector<Tensor>& in) {
        return std::vector<Tensor>{grouped_linear(in[0], in[1], blocks)};
      },
      (std::vector<Tensor>{x, w}));
}

// Tiles of 3 rows: expert 0 has 4 rows (2 tiles, 2 padding rows), expert 1 none, expert 2 has 3
// rows (1 tile), and a last tile past the groups uses expert 0's matrix.
TiledGroups tiled_test_groups() {
  TiledGroups g;
  g.tile = 3;
  g.tiles = tensor(std::vector<int64_t>{0, 0, 2, -1}, {4});
  g.sizes = [] { return std::vector<int64_t>{4, 0, 3}; };
  return g;
}

TEST(TiledLinear, MatchesPerTileLinearAndTheGroupedWeightGradient) {
  const TiledGroups g = tiled_test_groups();
  Tensor x = randn64({12, 5}, 40), w = randn64({3, 7, 5}, 41);
  const auto got = tiled_linear(x, w, g).to_vector<double>();
  std::vector<double> ref;
  for (const int64_t e : {0, 0, 2, 0}) {
    const int64_t row = static_cast<int64_t>(ref.size()) / 7;
    const auto part = linear(x.narrow(0, row, 3), w.select(0, e)).to_vector<double>();
    ref.insert(ref.end(), part.begin(), part.end());
  }
  expect_near_all(got, ref, 1e-12, "tiled_linear");
  // The weight gradient counts the groups' rows only (not the padding rows 4, 5 or the last
  // tile); the input gradient covers every row.
  Generator gen(42);
  const Tensor gy = randn({12, 7}, gen, 0, 1, DType::kF64);
  sum(mul(tiled_linear(x, w, g), gy)).backward();
  const Tensor x0 = x.detach(), w0 = w.detach();
  const Tensor want_gw0 = matmul(gy.narrow(0, 0, 4).transpose(0, 1), x0.narrow(0, 0, 4));
  const Tensor want_gw2 = matmul(gy.narrow(0, 6, 3).transpose(0, 1), x0.narrow(0, 6, 3));
  expect_near_all(w.grad().select(0, 0).to_vector<double>(), want_gw0.to_vector<double>(), 1e-12,
                  "gw0");
  expect_near_all(w.grad().select(0, 1).to_vector<double>(), std::vector<double>(35, 0.0), 0,
                  "gw1");
  expect_near_all(w.grad().select(0, 2).to_vector<double>(), want_gw2.to_vector<double>(), 1e-12,
                  "gw2");
  const Tensor want_gx = concat(
      {matmul(gy.narrow(0, 0, 6), w0.select(0, 0)), matmul(gy.narrow(0, 6, 3), w0.select(0, 2)),
       matmul(gy.narrow(0, 9, 3), w0.select(0, 0))},
      0);
  expect_near_all(x.grad().to_vector<double>(), want_gx.to_vector<double>(), 1e-12, "gx");
}

TEST(TiledLinear, GradcheckFloat64OnTheGroupsRows) {
  // Padding rows have no weight gradient by design, so the check perturbs a layout without them.
  TiledGroups g;
  g.tile = 2;
  g.tiles = tensor(std::vector<int64_t>{0, 0, 1}, {3});
  g.sizes = [] { return std::vector<int64_t>{4, 2}; };
  HYDRA_EXPECT_GRADCHECK(
      [&](const std::vector<Tensor>& in) {
        return std::vector<Tensor>{tiled_linear(in[0], in[1], g)};
      },
      (std::vector<Tensor>{randn64({6, 4}, 43), randn64({2, 3, 4}, 44)}));
}

// An input read by two tiled linears (an expert's gate and up projections): the second adds its
// input gradient into the first's (gradient_sum_target, a tile GEMM with beta = 1).
TEST(TiledLinear, GradcheckFloat64OfAnInputReadTwice) {
  TiledGroups g;
  g.tile = 2;
  g.tiles = tensor(std::vector<int64_t>{0, 0, 1}, {3});
  g.sizes = [] { return std::vector<int64_t>{4, 2}; };
  HYDRA_EXPECT_GRADCHECK(
      [&](const std::vector<Tensor>& in) {
        return std::vector<Tensor>{
            concat({tiled_linear(in[0], in[1], g), tiled_linear(in[0], in[2], g)}, 1)};
      },
      (std::vector<Tensor>{randn64({6, 4}, 45), randn64({2, 3, 4}, 46), randn64({2, 5, 4}, 47)}));
}

TEST(GroupedLinear, EmptyFeaturesAndUntouchedExpertsGiveZeros) {
  // No input features: the outputs are zeros, as is the weight gradient of every expert.
  Tensor x0 = randn64({4, 0}, 30), w0 = randn64({2, 3, 0}, 31);
  const Tensor y0 = grouped_linear(x0, w0, {1, 3});
  EXPECT_EQ(y0.to_vector<double>(), std::vector<double>(12, 0.0));
  sum(y0).backward();
  EXPECT_EQ(x0.grad().numel(), 0);
  // An expert no group reaches gets a zero gradient, not an unwritten one.
  Tensor x = randn64({5, 3}, 32), w = randn64({3, 2, 3}, 33);
  sum(grouped_linear(x, w, {2, 0, 3})).backward();
  const auto gw = w.grad().to_vector<double>();
  for (int64_t e = 0; e < 6; ++e) EXPECT_EQ(gw[6 + e], 0.0) << e;
  EXPECT_NE(gw[0], 0.0);
}

TEST(EmbeddingBag, MatchesReferenceAtOddShape) {
  Tensor table = randn64({13, 7}, 20, 1.0, false), w = randn64({5, 3}, 21, 1.0, false);
  Tensor idx = testing::randidx(13, {5, 3}, 22);
  const auto tv = table.to_vector<double>(), wv = w.to_vector<double>(),
             got = embedding_bag(table, idx, w).to_vector<double>();
  const auto iv = idx.to_vector<int64_t>();
  for (int t = 0; t < 5; ++t)
    for (int c = 0; c < 7; ++c) {
      double s = 0;
      for (int k = 0; k < 3; ++k) s += wv[t * 3 + k] * tv[iv[t * 3 + k] * 7 + c];
      EXPECT_NEAR(got[t * 7 + c], s, 1e-12);
    }
}

TEST(EmbeddingBag, GradcheckFloat64DenseAndSparse) {
  Tensor idx = tensor<int64_t>({0, 3, 3, 5, 1, 0}, {3, 2});  // repeated rows must add up
  for (bool sparse : {false, true}) {
    HYDRA_EXPECT_GRADCHECK(
        [&](const std::vector<Tensor>& in) {
          return std::vector<Tensor>{embedding_bag(in[0], idx, in[1], sparse)};
        },
        (std::vector<Tensor>{randn64({6, 4}, 23), randn64({3, 2}, 24)}));
  }
}

TEST(EmbeddingBag, SparseGradientHoldsOnlyTouchedRowsAndAccumulates) {
  Tensor table = randn64({100, 4}, 25);
  Tensor w = randn64({2, 2}, 26, 1.0, false);
  int ready = 0;
  table.add_grad_ready_hook([&](const Tensor&) { ++ready; });
  sum(embedding_bag(table, tensor<int64_t>({7, 42, 42, 3}, {2, 2}), w, true)).backward();
  sum(embedding_bag(table, tensor<int64_t>({3, 99, 0, 0}, {2, 2}), w, true)).backward();
  ASSERT_TRUE(table.sparse_grad() != nullptr);
  EXPECT_FALSE(table.grad().defined());
  EXPECT_EQ(table.sparse_grad()->rows.to_vector<int64_t>(),
            (std::vector<int64_t>{0, 3, 7, 42, 99}));
  EXPECT_EQ(ready, 2);
  const auto wv = w.to_vector<double>();
  const auto dense = densify_sparse_grad(table).to_vector<double>();
  EXPECT_NEAR(dense[42 * 4], wv[1] + wv[2], 1e-12);
  EXPECT_NEAR(dense[3 * 4], wv[3] + wv[0], 1e-12);
  EXPECT_NEAR(dense[0], wv[2] + wv[3], 1e-12);
}

TEST(ProductKeys, IndicesFollowTheGridAndBadShapesAreRefused) {
  // Rows of a, b: the top-k keys of each half; pick: cells c of their k x k grid (k = 3).
  const Tensor a = tensor<int64_t>({4, 0, 2, 1, 1, 3}, {2, 3}),
               b = tensor<int64_t>({2, 4, 0, 3, 0, 1}, {2, 3});
  const Tensor pick = tensor<int64_t>({0, 5, 8, 7}, {2, 2});
  // row 0: c 0 -> a 4, b 2; c 5 -> a 0 (5 / 3 = 1), b 0 (5 % 3 = 2). row 1: c 8 -> a 3, b 1; c 7 ->
  // a 3, b 0.
  EXPECT_EQ(product_key_indices(a, b, pick, 5).to_vector<int64_t>(),
            (std::vector<int64_t>{4 * 5 + 2, 0 * 5 + 0, 3 * 5 + 1, 3 * 5 + 0}));
  EXPECT_THROW(product_key_indices(a, b.narrow(1, 0, 2), pick, 5), Error);
  EXPECT_THROW(product_key_indices(a, b, tensor<int64_t>({0, 1}, {1, 2}), 5), Error);
  EXPECT_THROW(product_key_indices(a.to(DType::kF32), b, pick, 5), Error);
}

}  // namespace
}  // namespace hydra
