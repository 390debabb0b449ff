// CPU kernels must give bit-identical results on any thread count (HYDRA_NUM_THREADS).
#include <gtest/gtest.h>

#include <functional>

#include "autograd/ops.h"
#include "kernels/base/parallel.h"
#include "tests/test_util.h"

namespace hydra {
namespace {

using testing::bitwise_equal;
using testing::randn32;

// Runs fn with 1 thread and with 4, and returns both results.
std::pair<std::vector<Tensor>, std::vector<Tensor>> run_both(
    const std::function<std::vector<Tensor>()>& fn) {
  const int saved = num_threads();
  set_num_threads(1);
  auto one = fn();
  set_num_threads(4);
  auto four = fn();
  set_num_threads(saved);
  return {one, four};
}

void expect_thread_independent(const char* what, const std::function<std::vector<Tensor>()>& fn) {
  auto [one, four] = run_both(fn);
  ASSERT_EQ(one.size(), four.size());
  for (std::size_t i = 0; i < one.size(); ++i)
    EXPECT_TRUE(bitwise_equal(one[i], four[i])) << what << " output " << i;
}

// Forward outputs and the gradients of every input (sum(out * w) backward).
std::vector<Tensor> with_grads(const std::vector<Tensor>& inputs,
                               const std::function<Tensor(const std::vector<Tensor>&)>& f) {
  std::vector<Tensor> leaves;
  for (const Tensor& t : inputs) {
    Tensor l = t.detach().clone();
    if (is_floating(l.dtype())) l.set_requires_grad(true);
    leaves.push_back(l);
  }
  Tensor out = f(leaves);
  Generator gen(1);
  sum(mul(out, randn(out.shape(), gen))).backward();
  std::vector<Tensor> res = {out.detach()};
  for (const Tensor& l : leaves)
    if (l.requires_grad()) res.push_back(l.grad());
  return res;
}

TEST(Threads, ReductionsAreThreadCountIndependent) {
  Tensor x = randn32({3, 50000}, 1);
  expect_thread_independent("sum", [&] {
    return std::vector<Tensor>{sum(x), sum(x, {1}), sum(x, {0}), mean(x, {0, 1})};
  });
  Tensor y = randn32({5000, 37}, 2);
  expect_thread_independent("sum rows", [&] {
    return std::vector<Tensor>{sum(y, {0}), sum_squares(y)};
  });
}

TEST(Threads, OpsAndGradientsAreThreadCountIndependent) {
  expect_thread_independent("rms_norm", [] {
    return with_grads({randn32({700, 64}, 3), randn32({64}, 4)},
                      [](const std::vector<Tensor>& in) { return rms_norm(in[0], in[1]); });
  });
  expect_thread_independent("selective_scan", [] {
    return with_grads(
        {randn32({2, 300, 48}, 5), randn32({2, 300, 48}, 6), randn32({48, 16}, 7, 0.5),
         randn32({2, 300, 16}, 8), randn32({2, 300, 16}, 9)},
        [](const std::vector<Tensor>& in) {
          return selective_scan(in[0], in[1], in[2], in[3], in[4], Tensor(), Tensor(), Tensor(),
                                Tensor())
              .y;
        });
  });
  expect_thread_independent("causal_conv1d", [] {
    return with_grads({randn32({2, 200, 96}, 10), randn32({96, 4}, 11), randn32({96}, 12)},
                      [](const std::vector<Tensor>& in) {
                        return causal_conv1d(in[0], in[1], in[2], Tensor(), true);
                      });
  });
  expect_thread_independent("embedding", [] {
    Generator g(13);
    Tensor idx = randint(0, 50, {4000}, g);
    return with_grads({randn32({50, 130}, 14)},
                      [idx](const std::vector<Tensor>& in) { return embedding(in[0], idx); });
  });
  expect_thread_independent("matmul", [] {
    return with_grads({randn32({300, 200}, 15), randn32({200, 150}, 16)},
                      [](const std::vector<Tensor>& in) { return matmul(in[0], in[1]); });
  });
  expect_thread_independent("cross_entropy", [] {
    Generator g(17);
    Tensor t = randint(0, 300, {500}, g);
    return with_grads({randn32({500, 300}, 18)},
                      [t](const std::vector<Tensor>& in) { return cross_entropy(in[0], t); });
  });
}

}  // namespace
}  // namespace hydra
