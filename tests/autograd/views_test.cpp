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

// reshape returns a view whenever the elements' order allows one, also of a non-contiguous tensor
// (a narrowed last dimension's leading dimensions merged or split; size-1 dimensions anywhere),
// and copies otherwise (a transposed pair merged); either way the values and the gradient are those
// of the copy.
TEST(Views, ReshapeIsAViewWhenTheStridesAllowOne) {
  const Tensor x = randn64({3, 4, 7}, 4);
  const Tensor part = x.narrow(2, 1, 5);  // [3, 4, 5], rows of 7
  struct Case {
    Tensor in;
    Shape shape;
    bool view;
  };
  const std::vector<Case> cases = {
      {part, {12, 5}, true},
      {part, {3, 2, 2, 5}, true},
      {part, {1, 12, 1, 5}, true},
      {part.unsqueeze(1), {12, 5}, true},
      {part, {3, 20}, false},               // merges the narrowed dimension with another
      {x.transpose(0, 1), {12, 7}, false},  // [4, 3, 7] in the order of [3, 4, 7]
      {x.transpose(1, 2), {3, 28}, false},
      {x.transpose(0, 1).narrow(0, 1, 1), {3, 7}, true},  // a size-1 dimension's stride is free
  };
  for (const Case& c : cases) {
    const Tensor r = c.in.reshape(c.shape);
    EXPECT_EQ(r.shape(), c.shape);
    EXPECT_EQ(r.storage() == c.in.storage(), c.view)
        << shape_str(c.in.shape()) << " -> " << shape_str(c.shape);
    EXPECT_EQ(r.to_vector<double>(), c.in.contiguous().view(c.shape).to_vector<double>())
        << shape_str(c.in.shape()) << " -> " << shape_str(c.shape);
  }
  HYDRA_EXPECT_GRADCHECK(
      [](const std::vector<Tensor>& in) {
        const Tensor p = in[0].narrow(2, 1, 5);
        return std::vector<Tensor>{square(p.reshape({12, 5})), exp(p.reshape({3, 2, 2, 5})),
                                   p.reshape({3, 20})};
      },
      (std::vector<Tensor>{randn64({3, 4, 7}, 5)}));
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
