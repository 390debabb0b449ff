// Division by a divisor fixed at launch, as a multiply and a shift (Granlund and Montgomery,
// "Division by invariant integers using multiplication", 1994): for 1 <= d < 2^31 and 0 <= n <
// 2^31, with l = ceil(log2 d), m = ceil(2^(31 + l) / d) fits in 32 bits and n / d = (n * m) >> (31
// + l), because m * d - 2^(31 + l) < d <= 2^l makes the error n * (m * d - 2^(31 + l)) / d smaller
// than one. Built on the host, used on either side; kernels use it where a per-element `%` by a
// runtime value would cost a division sequence each.
#pragma once

#include <cstdint>

#include "base/dtype.h"

namespace hydra::kernels {

class FastDivisor {
 public:
  FastDivisor() = default;
  // d in [1, 2^31).
  explicit FastDivisor(uint32_t d) : d_(d) {
    int l = 0;
    while ((uint64_t{1} << l) < d) ++l;
    shift_ = 31 + l;
    m_ = static_cast<uint32_t>(((uint64_t{1} << shift_) + d - 1) / d);
  }
  // n in [0, 2^31).
  HYDRA_HD uint32_t div(uint32_t n) const {
    return static_cast<uint32_t>((static_cast<uint64_t>(n) * m_) >> shift_);
  }
  HYDRA_HD uint32_t mod(uint32_t n) const { return n - div(n) * d_; }
  HYDRA_HD uint32_t divisor() const { return d_; }

 private:
  uint32_t d_ = 1, m_ = 0x80000000u;
  int shift_ = 31;
};

}  // namespace hydra::kernels
