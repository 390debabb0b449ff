#include <gtest/gtest.h>

#include <cmath>
#include <functional>

#include "autograd/ops.h"
#include "tests/test_util.h"

namespace hydra {
namespace {

using testing::randn64;

// Naive broadcast reference over row-major shapes.
std::vector<double> broadcast_ref(const Tensor& a, const Tensor& b,
                                  const std::function<double(double, double)>& f) {
  const Shape out = broadcast_shapes(a.shape(), b.shape(), "test");
  const std::vector<double> av = a.to_vector<double>(), bv = b.to_vector<double>();
  std::vector<double> r(shape_numel(out));
  const int64_t n = static_cast<int64_t>(out.size());
  for (int64_t i = 0; i < static_cast<int64_t>(r.size()); ++i) {
    int64_t rem = i, ia = 0, ib = 0, sa = 1, sb = 1;
    for (int64_t d = n - 1; d >= 0; --d) {
      const int64_t k = rem % out[d];
      rem /= out[d];
      const int64_t da = d - (n - a.dim()), db = d - (n - b.dim());
      if (da >= 0) {
        if (a.shape()[da] != 1) ia += k * sa;
        sa *= a.shape()[da];
      }
      if (db >= 0) {
        if (b.shape()[db] != 1) ib += k * sb;
        sb *= b.shape()[db];
      }
    }
    r[i] = f(av[ia], bv[ib]);
  }
  return r;
}

struct BinaryCase {
  const char* name;
  std::function<Tensor(const Tensor&, const Tensor&)> op;
  std::function<double(double, double)> ref;
};

const std::vector<BinaryCase>& binary_cases() {
  static const std::vector<BinaryCase> cases = {
      {"add", [](const Tensor& a, const Tensor& b) { return add(a, b); },
       [](double x, double y) { return x + y; }},
      {"sub", [](const Tensor& a, const Tensor& b) { return sub(a, b); },
       [](double x, double y) { return x - y; }},
      {"mul", [](const Tensor& a, const Tensor& b) { return mul(a, b); },
       [](double x, double y) { return x * y; }},
      {"div", [](const Tensor& a, const Tensor& b) { return div(a, b); },
       [](double x, double y) { return x / y; }},
  };
  return cases;
}

// Denominators away from zero: 1.5 + |b|.
Tensor positive(const Tensor& t) {
  std::vector<double> v = t.to_vector<double>();
  for (double& x : v) x = 1.5 + std::abs(x);
  Tensor p = tensor(v, t.shape());
  p.set_requires_grad(true);
  return p;
}

TEST(Binary, MatchesReferenceAtOddShapesWithBroadcasting) {
  const std::vector<std::pair<Shape, Shape>> shapes = {{{7, 13, 5}, {7, 13, 5}},
                                                       {{7, 13, 5}, {13, 1}},
                                                       {{7, 1, 5}, {13, 5}},
                                                       {{1}, {7, 13, 5}},
                                                       {{5}, {7, 13, 1}}};
  for (const auto& c : binary_cases()) {
    for (const auto& [sa, sb] : shapes) {
      Tensor a = randn64(sa, 1, 1.0, false), b = positive(randn64(sb, 2, 1.0, false));
      const std::vector<double> ref = broadcast_ref(a, b, c.ref);
      const std::vector<double> got = c.op(a, b).to_vector<double>();
      ASSERT_EQ(got.size(), ref.size()) << c.name;
      for (std::size_t i = 0; i < ref.size(); ++i)
        ASSERT_NEAR(got[i], ref[i], 1e-12) << c.name << " at " << i;
    }
  }
}

TEST(Binary, GradcheckFloat64WithBroadcasting) {
  for (const auto& c : binary_cases()) {
    Tensor a = randn64({3, 1, 4}, 3), b = positive(randn64({5, 1}, 4));
    HYDRA_EXPECT_GRADCHECK(
        [&](const std::vector<Tensor>& in) { return std::vector<Tensor>{c.op(in[0], in[1])}; },
        (std::vector<Tensor>{a, b}));
  }
}

TEST(Binary, StridedOperandsMatchContiguous) {
  Tensor a = randn64({5, 7}, 5, 1.0, false), b = randn64({7, 5}, 6, 1.0, false);
  EXPECT_EQ(mul(a, b.transpose(0, 1)).to_vector<double>(),
            mul(a, b.transpose(0, 1).contiguous()).to_vector<double>());
}

struct UnaryCase {
  const char* name;
  std::function<Tensor(const Tensor&)> op;
  std::function<double(double)> ref;
  bool positive_domain;
};

const std::vector<UnaryCase>& unary_cases() {
  static const std::vector<UnaryCase> cases = {
      {"neg", [](const Tensor& x) { return neg(x); }, [](double v) { return -v; }, false},
      {"exp", [](const Tensor& x) { return exp(x); }, [](double v) { return std::exp(v); }, false},
      {"log", [](const Tensor& x) { return log(x); }, [](double v) { return std::log(v); }, true},
      {"sigmoid", [](const Tensor& x) { return sigmoid(x); },
       [](double v) { return 1 / (1 + std::exp(-v)); }, false},
      {"silu", [](const Tensor& x) { return silu(x); },
       [](double v) { return v / (1 + std::exp(-v)); }, false},
      {"softplus", [](const Tensor& x) { return softplus(x); },
       [](double v) { return std::log1p(std::exp(v)); }, false},
      {"gelu", [](const Tensor& x) { return gelu(x); },
       [](double v) { return 0.5 * v * (1 + std::erf(v / std::sqrt(2.0))); }, false},
      {"relu", [](const Tensor& x) { return relu(x); }, [](double v) { return v > 0 ? v : 0; },
       false},
      {"sqrt", [](const Tensor& x) { return sqrt(x); }, [](double v) { return std::sqrt(v); },
       true},
      {"rsqrt", [](const Tensor& x) { return rsqrt(x); }, [](double v) { return 1 / std::sqrt(v); },
       true},
      {"square", [](const Tensor& x) { return square(x); }, [](double v) { return v * v; }, false},
      {"tanh", [](const Tensor& x) { return tanh(x); }, [](double v) { return std::tanh(v); },
       false},
      {"pow", [](const Tensor& x) { return pow(x, 1.7); },
       [](double v) { return std::pow(v, 1.7); }, true},
      {"affine", [](const Tensor& x) { return affine(x, -0.3, 2.0); },
       [](double v) { return -0.3 * v + 2.0; }, false},
      {"scale", [](const Tensor& x) { return x * 2.5; }, [](double v) { return 2.5 * v; }, false},
  };
  return cases;
}

TEST(Unary, MatchesReferenceAtOddShape) {
  for (const auto& c : unary_cases()) {
    Tensor x = randn64({7, 13, 5}, 7, 2.0, false);
    if (c.positive_domain) x = positive(x).detach();
    const std::vector<double> xv = x.to_vector<double>(), got = c.op(x).to_vector<double>();
    for (std::size_t i = 0; i < xv.size(); ++i)
      ASSERT_NEAR(got[i], c.ref(xv[i]), 1e-12) << c.name << " at " << xv[i];
  }
}

TEST(Unary, GradcheckFloat64) {
  for (const auto& c : unary_cases()) {
    Tensor x = randn64({4, 3}, 8, 2.0);
    if (c.positive_domain) x = positive(x);
    const Status st = gradcheck(
        [&](const std::vector<Tensor>& in) { return std::vector<Tensor>{c.op(in[0])}; }, {x});
    EXPECT_TRUE(st.ok()) << c.name << ": " << st.message();
  }
}

TEST(Unary, NonContiguousInput) {
  Tensor x = randn64({6, 4}, 9, 1.0, false);
  EXPECT_EQ(exp(x.transpose(0, 1)).to_vector<double>(),
            exp(x.transpose(0, 1).contiguous()).to_vector<double>());
}

}  // namespace
}  // namespace hydra
