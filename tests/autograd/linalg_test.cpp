#include <gtest/gtest.h>

#include "autograd/ops.h"
#include "tests/test_util.h"

namespace hydra {
namespace {

using testing::randn64;

// Naive batched matmul of row-major [B, M, K] x [B, K, N] (B = 1 allowed on either side).
std::vector<double> matmul_ref(const Tensor& a, const Tensor& b) {
  const Tensor a3 = a.reshape({-1, a.size(-2), a.size(-1)}),
               b3 = b.reshape({-1, b.size(-2), b.size(-1)});
  const int64_t B = std::max(a3.size(0), b3.size(0)), M = a3.size(1), K = a3.size(2),
                N = b3.size(2);
  const auto av = a3.to_vector<double>(), bv = b3.to_vector<double>();
  std::vector<double> r(B * M * N, 0.0);
  for (int64_t p = 0; p < B; ++p)
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) {
        double s = 0;
        for (int64_t k = 0; k < K; ++k)
          s += av[((a3.size(0) == 1 ? 0 : p) * M + i) * K + k] *
               bv[((b3.size(0) == 1 ? 0 : p) * K + k) * N + j];
        r[(p * M + i) * N + j] = s;
      }
  return r;
}

void expect_matches(const Tensor& got, const std::vector<double>& ref) {
  const auto g = got.to_vector<double>();
  ASSERT_EQ(g.size(), ref.size());
  for (std::size_t i = 0; i < ref.size(); ++i) ASSERT_NEAR(g[i], ref[i], 1e-11) << "at " << i;
}

TEST(Matmul, MatchesReferenceAtOddShapes) {
  Tensor a = randn64({7, 13}, 1, 1.0, false), b = randn64({13, 5}, 2, 1.0, false);
  expect_matches(matmul(a, b), matmul_ref(a, b));
  Tensor a3 = randn64({3, 7, 13}, 3, 1.0, false);
  expect_matches(matmul(a3, b), matmul_ref(a3.reshape({1, 21, 13}), b));
  Tensor b3 = randn64({3, 13, 5}, 4, 1.0, false);
  expect_matches(matmul(a3, b3), matmul_ref(a3, b3));
  Tensor a4 = randn64({2, 3, 7, 13}, 5, 1.0, false), b4 = randn64({2, 3, 13, 5}, 6, 1.0, false);
  expect_matches(matmul(a4, b4), matmul_ref(a4, b4));
}

TEST(Matmul, TransposedViewsNeedNoCopyAndMatch) {
  Tensor at = randn64({13, 7}, 7, 1.0, false), bt = randn64({5, 13}, 8, 1.0, false);
  Tensor a = at.transpose(0, 1), b = bt.transpose(0, 1);
  expect_matches(matmul(a, b), matmul_ref(a.contiguous(), b.contiguous()));
  Tensor a3t = randn64({3, 13, 7}, 9, 1.0, false);
  expect_matches(matmul(a3t.transpose(1, 2), randn64({3, 13, 5}, 10, 1.0, false)),
                 matmul_ref(a3t.transpose(1, 2).contiguous(), randn64({3, 13, 5}, 10, 1.0, false)));
}

TEST(Matmul, GradcheckFloat64) {
  Tensor a = randn64({4, 3}, 11), b = randn64({3, 5}, 12);
  HYDRA_EXPECT_GRADCHECK(
      [](const std::vector<Tensor>& in) { return std::vector<Tensor>{matmul(in[0], in[1])}; },
      (std::vector<Tensor>{a, b}));
  Tensor a3 = randn64({2, 4, 3}, 13);
  HYDRA_EXPECT_GRADCHECK(
      [](const std::vector<Tensor>& in) { return std::vector<Tensor>{matmul(in[0], in[1])}; },
      (std::vector<Tensor>{a3, b}));
}

TEST(BatchedMatmul, GradcheckFloat64WithTransposedOperand) {
  Tensor a = randn64({2, 3, 4}, 14), b = randn64({2, 5, 3}, 15);
  HYDRA_EXPECT_GRADCHECK(
      [](const std::vector<Tensor>& in) {
        return std::vector<Tensor>{matmul(in[0].transpose(1, 2), in[1].transpose(1, 2))};
      },
      (std::vector<Tensor>{a, b}));
}

TEST(Linear, MatchesReferenceAtOddShape) {
  Tensor x = randn64({7, 13, 5}, 16, 1.0, false), w = randn64({3, 5}, 17, 1.0, false),
         bias = randn64({3}, 18, 1.0, false);
  Tensor y = linear(x, w, bias);
  EXPECT_EQ(y.shape(), (Shape{7, 13, 3}));
  std::vector<double> ref = matmul_ref(x.reshape({1, 91, 5}), w.transpose(0, 1).contiguous());
  const auto bv = bias.to_vector<double>();
  for (std::size_t i = 0; i < ref.size(); ++i) ref[i] += bv[i % 3];
  expect_matches(y, ref);
  expect_matches(linear(x, w), matmul_ref(x.reshape({1, 91, 5}), w.transpose(0, 1).contiguous()));
}

TEST(Linear, GradcheckFloat64) {
  Tensor x = randn64({2, 3, 4}, 19), w = randn64({5, 4}, 20), b = randn64({5}, 21);
  HYDRA_EXPECT_GRADCHECK(
      [](const std::vector<Tensor>& in) {
        return std::vector<Tensor>{linear(in[0], in[1], in[2])};
      },
      (std::vector<Tensor>{x, w, b}));
  HYDRA_EXPECT_GRADCHECK(
      [](const std::vector<Tensor>& in) { return std::vector<Tensor>{linear(in[0], in[1])}; },
      (std::vector<Tensor>{x, w}));
}

}  // namespace
}  // namespace hydra
