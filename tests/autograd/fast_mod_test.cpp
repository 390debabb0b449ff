// FastDivisor (kernels/base/fast_mod.h) against the hardware division, over divisors and dividends
// at the edges of its range and at random.
#include "kernels/base/fast_mod.h"

#include <gtest/gtest.h>

#include <random>
#include <vector>

namespace hydra::kernels {
namespace {

TEST(FastDivisor, MatchesDivisionOverItsRange) {
  std::vector<uint32_t> divisors;
  for (uint32_t d = 1; d <= 1100; ++d) divisors.push_back(d);
  for (int k = 0; k < 31; ++k) {
    const uint32_t p = uint32_t{1} << k;
    for (uint32_t d : {p - 1, p, p + 1})
      if (d >= 1 && d < (uint32_t{1} << 31)) divisors.push_back(d);
  }
  std::mt19937 gen(5);
  std::uniform_int_distribution<uint32_t> any(1, 0x7fffffffu);
  for (int i = 0; i < 300; ++i) divisors.push_back(any(gen));
  for (uint32_t d : divisors) {
    const FastDivisor f(d);
    std::vector<uint32_t> ns = {0,         1,           d - 1,       d,          d + 1,
                                2 * d - 1, 0x7fffffffu, 0x7ffffffeu, 0x40000000u};
    for (int i = 0; i < 200; ++i) ns.push_back(any(gen) - 1);
    for (uint32_t n = 0; n < 600; ++n) ns.push_back(n);
    for (uint32_t n : ns) {
      if (n > 0x7fffffffu) continue;
      ASSERT_EQ(f.div(n), n / d) << n << " / " << d;
      ASSERT_EQ(f.mod(n), n % d) << n << " % " << d;
    }
  }
}

}  // namespace
}  // namespace hydra::kernels
