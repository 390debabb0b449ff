#include <gtest/gtest.h>

#include "autograd/ops.h"
#include "tests/test_util.h"

namespace hydra {
namespace {

using testing::randn64;

TEST(Views, GradcheckFloat64ThroughEveryView) {
  HYDRA_EXPECT_GRADCHECK(
      [](const std::vector<Tensor>& in) {
        const Tensor& x = in[0];                                   // [3, 4, 5]
        Tensor a = x.transpose(0, 2).slice(1, 1, 4, 2);            // [5, 2, 3]
        Tensor b = x.permute({1, 0, 2}).narrow(2, 1, 3);           // [4, 3, 3]
        Tensor c = x.select(1, 2).unsqueeze(0).expand({2, 3, 5});  // [2, 3, 5]
        Tensor d = x.reshape({12, 5}).flatten().reshape({6, 10});
        return std::vector<Tensor>{exp(a), square(b), c, d};
      },
      (std::vector<Tensor>{randn64({3, 4, 5}, 1)}));
}

TEST(Views, GradcheckFloat64ThroughCopies) {
  HYDRA_EXPECT_GRADCHECK(
      [](const std::vector<Tensor>& in) {
        return std::vector<Tensor>{in[0].transpose(0, 1).contiguous(), in[0].clone()};
      },
      (std::vector<Tensor>{randn64({3, 4}, 2)}));
}

TEST(Views, DtypeConversionPassesGradientBack) {
  Tensor x = randn64({3, 4}, 3);
  Tensor y = mul(x.to(DType::kF32), 2.0);
  y.backward(ones({3, 4}));
  EXPECT_EQ(x.grad().dtype(), DType::kF64);
  for (double g : x.grad().to_vector<double>()) EXPECT_EQ(g, 2.0);
}

}  // namespace
}  // namespace hydra
