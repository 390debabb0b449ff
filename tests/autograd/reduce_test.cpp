#include <gtest/gtest.h>

#include "autograd/ops.h"
#include "tests/test_util.h"

namespace hydra {
namespace {

using testing::randn64;

// Naive sum of a [7, 13, 5] tensor over the axes in `mask`.
std::vector<double> sum_ref(const std::vector<double>& x, const Shape& s,
                            const std::vector<bool>& mask) {
  Shape out = s;
  for (int d = 0; d < 3; ++d)
    if (mask[d]) out[d] = 1;
  std::vector<double> r(shape_numel(out), 0.0);
  for (int64_t i = 0; i < s[0]; ++i)
    for (int64_t j = 0; j < s[1]; ++j)
      for (int64_t k = 0; k < s[2]; ++k) {
        const int64_t oi = mask[0] ? 0 : i, oj = mask[1] ? 0 : j, ok = mask[2] ? 0 : k;
        r[(oi * out[1] + oj) * out[2] + ok] += x[(i * s[1] + j) * s[2] + k];
      }
  return r;
}

TEST(Sum, MatchesReferenceOverEveryAxisSetAtOddShape) {
  const Shape s = {7, 13, 5};
  Tensor x = randn64(s, 1, 1.0, false);
  const std::vector<double> xv = x.to_vector<double>();
  const std::vector<std::vector<int64_t>> axis_sets = {{0},    {1},    {2}, {0, 1},
                                                       {0, 2}, {1, 2}, {},  {-1}};
  for (const auto& axes : axis_sets) {
    std::vector<bool> mask(3, axes.empty());
    for (int64_t a : axes) mask[a < 0 ? a + 3 : a] = true;
    const std::vector<double> ref = sum_ref(xv, s, mask);
    Tensor kept = sum(x, axes, true);
    const std::vector<double> got = kept.to_vector<double>();
    ASSERT_EQ(got.size(), ref.size());
    for (std::size_t i = 0; i < ref.size(); ++i) EXPECT_NEAR(got[i], ref[i], 1e-12);
    Tensor dropped = sum(x, axes, false);
    EXPECT_EQ(dropped.numel(), kept.numel());
  }
}

TEST(Sum, LongRowsUseBlockedPartials) {
  // 10000 > one 4096-element block: the blocked sum still equals the exact sum of integers.
  std::vector<double> v(10000);
  for (int i = 0; i < 10000; ++i) v[i] = i % 17;
  double exact = 0;
  for (double x : v) exact += x;
  EXPECT_EQ(sum(tensor(v, {10000})).item<double>(), exact);
}

TEST(Sum, GradcheckFloat64) {
  for (const std::vector<int64_t>& axes :
       std::vector<std::vector<int64_t>>{{0}, {1, 2}, {}, {0, 2}}) {
    Tensor x = randn64({3, 4, 5}, 2);
    HYDRA_EXPECT_GRADCHECK(
        [&](const std::vector<Tensor>& in) { return std::vector<Tensor>{sum(in[0], axes)}; },
        (std::vector<Tensor>{x}));
  }
}

TEST(Mean, MatchesSumOverCount) {
  Tensor x = randn64({7, 13, 5}, 3, 1.0, false);
  const auto m = mean(x, {1}).to_vector<double>(), s = sum(x, {1}).to_vector<double>();
  for (std::size_t i = 0; i < m.size(); ++i) EXPECT_NEAR(m[i], s[i] / 13, 1e-12);
  EXPECT_NEAR(mean(x).item<double>(), sum(x).item<double>() / (7 * 13 * 5), 1e-12);
}

TEST(Mean, GradcheckFloat64) {
  Tensor x = randn64({3, 4, 5}, 4);
  HYDRA_EXPECT_GRADCHECK(
      [&](const std::vector<Tensor>& in) {
        return std::vector<Tensor>{mean(in[0], {0, 2}, true)};
      },
      (std::vector<Tensor>{x}));
}

TEST(Amax, MatchesReferenceAtOddShape) {
  Tensor x = randn64({7, 13, 5}, 5, 1.0, false);
  const std::vector<double> xv = x.to_vector<double>(), got = amax(x, 1).to_vector<double>();
  for (int i = 0; i < 7; ++i)
    for (int k = 0; k < 5; ++k) {
      double m = -1e300;
      for (int j = 0; j < 13; ++j) m = std::max(m, xv[(i * 13 + j) * 5 + k]);
      EXPECT_EQ(got[i * 5 + k], m);
    }
}

TEST(SumSquares, MatchesReference) {
  Tensor x = randn64({7, 13, 5}, 6, 1.0, false);
  double ref = 0;
  for (double v : x.to_vector<double>()) ref += v * v;
  EXPECT_NEAR(sum_squares(x).item<double>(), ref, 1e-10);
}

}  // namespace
}  // namespace hydra
