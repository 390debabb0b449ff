#include <gtest/gtest.h>

#include <cmath>

#include "autograd/ops.h"
#include "kernels/base/parallel.h"
#include "tests/test_util.h"

namespace hydra {
namespace {

TEST(Random, SameSeedSameDrawsAndOffsetsAdvance) {
  Generator a(42), b(42);
  EXPECT_EQ(randn({1000}, a).to_vector<float>(), randn({1000}, b).to_vector<float>());
  EXPECT_EQ(a.state().offset, 250u);
  Generator c(43);
  EXPECT_NE(randn({8}, a).to_vector<float>(), randn({8}, c).to_vector<float>());
}

TEST(Random, ADrawCanBeReplayedFromItsState) {
  Generator g(7);
  (void)rand({13}, g);
  const GeneratorState s = g.state();
  const auto first = randn({100}, g).to_vector<float>();
  g.set_state(s);
  EXPECT_EQ(randn({100}, g).to_vector<float>(), first);
}

TEST(Random, IndependentOfThreadCount) {
  const int saved = num_threads();
  set_num_threads(1);
  Generator g1(3);
  const auto one = randn({100003}, g1).to_vector<float>();
  set_num_threads(4);
  Generator g4(3);
  const auto four = randn({100003}, g4).to_vector<float>();
  set_num_threads(saved);
  EXPECT_EQ(one, four);
}

TEST(Random, NormalAndUniformHaveTheRightMoments) {
  Generator g(11);
  const auto n = randn({200000}, g, 1.5, 2.0, DType::kF64).to_vector<double>();
  double m = 0, v = 0;
  for (double x : n) m += x;
  m /= n.size();
  for (double x : n) v += (x - m) * (x - m);
  v /= n.size();
  EXPECT_NEAR(m, 1.5, 0.02);
  EXPECT_NEAR(std::sqrt(v), 2.0, 0.02);
  const auto u = rand({200000}, g, -1.0, 3.0, DType::kF64).to_vector<double>();
  double um = 0, lo = 1e9, hi = -1e9;
  for (double x : u) {
    um += x;
    lo = std::min(lo, x);
    hi = std::max(hi, x);
  }
  EXPECT_NEAR(um / u.size(), 1.0, 0.02);
  EXPECT_GE(lo, -1.0);
  EXPECT_LT(hi, 3.0);
}

TEST(Random, RandintCoversTheRangeOnly) {
  Generator g(5);
  const auto v = randint(3, 9, {10000}, g).to_vector<int64_t>();
  std::vector<int> seen(6, 0);
  for (int64_t x : v) {
    ASSERT_GE(x, 3);
    ASSERT_LT(x, 9);
    ++seen[x - 3];
  }
  for (int c : seen) EXPECT_GT(c, 1400);
}

TEST(Random, RandintOverAWideRangeReachesEveryResidue) {
  // With 24 random bits, [0, 2^30) would give multiples of 64 only (every value % 8 == 0).
  Generator g(6);
  const auto v = randint(0, int64_t{1} << 30, {8000}, g).to_vector<int64_t>();
  std::vector<int> seen(8, 0);
  for (int64_t x : v) {
    ASSERT_GE(x, 0);
    ASSERT_LT(x, int64_t{1} << 30);
    ++seen[x % 8];
  }
  for (int c : seen) EXPECT_GT(c, 850);
}

}  // namespace
}  // namespace hydra
