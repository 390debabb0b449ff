#include "autograd/engine.h"

#include <gtest/gtest.h>

#include "autograd/checkpoint.h"
#include "autograd/grad_mode.h"
#include "autograd/node.h"
#include "autograd/ops.h"
#include "tests/test_util.h"

namespace hydra {
namespace {

using testing::randn64;

TEST(Engine, ChainRuleThroughSharedInput) {
  // f = sum(x * x + 3x) -> df/dx = 2x + 3 (x reaches the output by three paths)
  Tensor x = tensor<double>({1, -2, 0.5}, {3});
  x.set_requires_grad(true);
  Tensor f = sum(add(mul(x, x), mul(x, 3.0)));
  f.backward();
  EXPECT_EQ(x.grad().to_vector<double>(), (std::vector<double>{5, -1, 4}));
}

TEST(Engine, GradientsAccumulateAcrossBackwardCalls) {
  Tensor x = tensor<double>({2.0}, {1});
  x.set_requires_grad(true);
  sum(mul(x, 4.0)).backward();
  sum(mul(x, 4.0)).backward();
  EXPECT_DOUBLE_EQ(x.grad().item<double>(), 8.0);
}

TEST(Engine, NoGradRecordsNothing) {
  Tensor x = randn64({3}, 1);
  Tensor y;
  {
    NoGradGuard guard;
    y = exp(x);
  }
  EXPECT_FALSE(y.requires_grad());
  EXPECT_EQ(y.grad_fn(), nullptr);
  EXPECT_THROW(y.backward(ones({3}, DType::kF64)), Error);
}

TEST(Engine, DetachCutsTheGraph) {
  Tensor x = randn64({4}, 2);
  Tensor y = mul(x, 2.0).detach();
  EXPECT_FALSE(y.requires_grad());
  Tensor z = sum(mul(exp(x), y));
  z.backward();
  const auto g = x.grad().to_vector<double>(), xe = exp(x).detach().to_vector<double>(),
             yv = y.to_vector<double>();
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(g[i], xe[i] * yv[i], 1e-12);
}

TEST(Engine, SecondBackwardWithoutRetainGraphFails) {
  Tensor x = randn64({3}, 3);
  Tensor f = sum(exp(x));
  f.backward(Tensor(), /*retain_graph=*/true);
  f.backward();
  EXPECT_THROW(f.backward(), Error);
}

TEST(Engine, InPlaceChangeOfSavedTensorIsReported) {
  Tensor x = randn64({3}, 4);
  Tensor w = randn64({3}, 5, 1.0, /*requires_grad=*/false);
  Tensor f = sum(mul(x, w));
  w.mul_(2.0);
  try {
    f.backward();
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("modified in place"), std::string::npos) << e.what();
  }
}

TEST(Engine, GradientIsWrittenIntoItsDestination) {
  // x reaches f by three paths; its whole gradient lands in the destination (a view into a larger
  // buffer, as the gradient reducer's buckets are), which becomes x.grad; a second backward adds to
  // it.
  Tensor x = tensor<double>({1, -2, 0.5}, {3});
  x.set_requires_grad(true);
  Tensor bucket = full({7}, -9.0, DType::kF64);
  x.set_grad_destination(bucket.narrow(0, 2, 3));
  sum(add(mul(x, x), mul(x, 3.0))).backward();
  EXPECT_EQ(x.grad().to_vector<double>(), (std::vector<double>{5, -1, 4}));
  EXPECT_EQ(bucket.to_vector<double>(), (std::vector<double>{-9, -9, 5, -1, 4, -9, -9}));
  EXPECT_TRUE(x.grad().storage() == bucket.storage());
  sum(mul(x, 2.0)).backward();
  EXPECT_EQ(bucket.to_vector<double>(), (std::vector<double>{-9, -9, 7, 1, 6, -9, -9}));
  // Without a destination, a fresh gradient is its own tensor again.
  x.set_grad(Tensor());
  x.set_grad_destination(Tensor());
  sum(mul(x, 2.0)).backward();
  EXPECT_FALSE(x.grad().storage() == bucket.storage());
  // A destination of another shape or dtype is refused.
  EXPECT_THROW(x.set_grad_destination(zeros({4}, DType::kF64)), Error);
  EXPECT_THROW(x.set_grad_destination(zeros({3}, DType::kF32)), Error);
}

// A linear layer's weight gradient is computed straight into the destination (the op claims it); a
// weight used by two ops gets the sum there (only the first op may claim it); a later backward
// adds.
TEST(Engine, WeightGradientIsComputedInItsDestination) {
  const Tensor x1 = randn64({3, 7, 4}, 60, 1.0, false), x2 = randn64({2, 4}, 61, 1.0, false);
  const Tensor w0 = randn64({5, 4}, 62, 1.0, false);
  auto loss = [&](const Tensor& w, bool twice) {
    Tensor y = sum(mul(linear(x1, w), 0.5));
    return twice ? add(y, sum(mul(matmul(x2, w.transpose(0, 1)), 3.0))) : y;
  };
  for (const bool twice : {false, true}) {
    Tensor ref = w0.clone();
    ref.set_requires_grad(true);
    loss(ref, twice).backward();
    Tensor w = w0.clone();
    w.set_requires_grad(true);
    Tensor bucket = full({26}, -9.0, DType::kF64);
    w.set_grad_destination(bucket.narrow(0, 3, 20).view({5, 4}));
    loss(w, twice).backward();
    EXPECT_TRUE(w.grad().storage() == bucket.storage());
    EXPECT_LT(testing::rel_error(w.grad(), ref.grad()), 1e-15) << twice;
    const auto b = bucket.to_vector<double>();
    EXPECT_EQ(b[2], -9.0);
    EXPECT_EQ(b[23], -9.0);
    loss(w, twice).backward();  // .grad exists now: added to, in the bucket
    EXPECT_LT(testing::rel_error(w.grad(), mul(ref.grad(), 2.0)), 1e-15) << twice;
    EXPECT_TRUE(w.grad().storage() == bucket.storage());
  }
}

// A leaf whose gradient accumulates in another dtype (f32 here, f64 .grad; bf16 -> f32 under
// BF16_MIXED) gets its conversion queued with the others and run before any read: by .grad(), by
// a second gradient adding to it, at the end of the backward (a destination read as storage).
TEST(Engine, GradientConversionsAreQueuedAndWrittenBeforeAnyRead) {
  const Tensor x = randn64({3, 4}, 70, 1.0, false).to(DType::kF32);
  const Tensor a0 = randn64({4, 4}, 71, 0.5, false).to(DType::kF32),
               b0 = randn64({4, 2}, 72, 0.5, false).to(DType::kF32);
  // loss = sum(tanh(x a) b), with `a` used a second time when `twice`.
  auto loss = [&](const Tensor& a, const Tensor& b, bool twice) {
    Tensor h = tanh(matmul(x, a));
    if (twice) h = tanh(matmul(h, a));
    return sum(matmul(h, b));
  };
  for (const bool twice : {false, true}) {
    Tensor ra = a0.clone(), rb = b0.clone();  // the reference: f32 gradients, converted by hand
    ra.set_requires_grad(true);
    rb.set_requires_grad(true);
    loss(ra, rb, twice).backward();
    Tensor a = a0.clone(), b = b0.clone();
    a.set_requires_grad(true);
    b.set_requires_grad(true);
    a.set_grad_dtype(DType::kF64);
    b.set_grad_dtype(DType::kF64);
    Tensor bucket = full({10}, -9.0, DType::kF64);  // b's gradient lands in a destination
    b.set_grad_destination(bucket.narrow(0, 1, 8).view({4, 2}));
    bool b_pending_in_hook = false;
    std::vector<double> a_in_hook;
    a.add_grad_ready_hook([&](const Tensor& leaf) {
      // b's gradient came first (b is used last) and still waits; .grad() of `a` flushes.
      b_pending_in_hook = gradient_conversion_pending(b.unsafe_impl()->autograd.grad.get());
      a_in_hook = leaf.grad().to_vector<double>();
    });
    loss(a, b, twice).backward();
    EXPECT_TRUE(b_pending_in_hook) << twice;
    EXPECT_EQ(a.grad().dtype(), DType::kF64);
    EXPECT_FALSE(gradient_conversion_pending(b.unsafe_impl()->autograd.grad.get()));
    // b's values in its destination, read as storage after the backward.
    const auto bv = bucket.to_vector<double>(), rbv = rb.grad().to(DType::kF64).to_vector<double>();
    EXPECT_EQ(bv[0], -9.0);
    EXPECT_EQ(bv[9], -9.0);
    for (int i = 0; i < 8; ++i) EXPECT_EQ(bv[1 + i], rbv[i]) << twice << " " << i;
    // a: exact when used once; used twice, its two parts are added in f64 (the reference in f32).
    EXPECT_EQ(a_in_hook, a.grad().to_vector<double>());
    EXPECT_LE(testing::rel_error(a.grad(), ra.grad().to(DType::kF64)), twice ? 1e-6 : 0.0) << twice;
    loss(a, b, twice).backward();  // a second backward adds to the f64 gradients
    EXPECT_LT(testing::rel_error(a.grad(), mul(ra.grad().to(DType::kF64), 2.0)), 1e-6) << twice;
  }
}

TEST(Engine, GradReadyHookFiresOnceAfterAccumulation) {
  // w is used twice; the hook must see the complete gradient exactly once.
  Tensor w = randn64({2, 2}, 6);
  Tensor x = randn64({3, 2}, 7, 1.0, false);
  int calls = 0;
  std::vector<double> seen;
  w.add_grad_ready_hook([&](const Tensor& leaf) {
    ++calls;
    seen = leaf.grad().to_vector<double>();
  });
  Tensor y = matmul(matmul(x, w), w);
  sum(y).backward();
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(seen, w.grad().to_vector<double>());
}

TEST(Engine, LaterLayersGradientsAreReadyFirst) {
  // Three layers; hooks must fire in reverse order of use (what overlapped all-reduce relies on).
  std::vector<Tensor> ws = {randn64({4, 4}, 8), randn64({4, 4}, 9), randn64({4, 4}, 10)};
  std::vector<int> order;
  for (int i = 0; i < 3; ++i)
    ws[i].add_grad_ready_hook([&order, i](const Tensor&) { order.push_back(i); });
  Tensor h = randn64({2, 4}, 11, 1.0, false);
  for (const Tensor& w : ws) h = tanh(matmul(h, w));
  sum(h).backward();
  EXPECT_EQ(order, (std::vector<int>{2, 1, 0}));
}

TEST(Engine, UnusedOutputOfMultiOutputOpGetsNoGradient) {
  Tensor x = randn64({6, 3}, 12);
  auto parts = split(x, {2, 4}, 0);
  sum(exp(parts[1])).backward();
  const auto g = x.grad().to_vector<double>();
  for (int i = 0; i < 6; ++i) EXPECT_EQ(g[i], 0.0);
  const auto xs = x.detach().to_vector<double>();
  for (int i = 6; i < 18; ++i) EXPECT_NEAR(g[i], std::exp(xs[i]), 1e-12);
}

TEST(Checkpoint, MatchesPlainBackward) {
  Tensor w1 = randn64({5, 5}, 13), w2 = randn64({5, 5}, 14);
  Tensor x = randn64({3, 5}, 15);
  auto block = [&](const std::vector<Tensor>& in) {
    return std::vector<Tensor>{silu(matmul(tanh(matmul(in[0], w1)), w2))};
  };
  sum(square(block({x})[0])).backward();
  const auto gx = x.grad().to_vector<double>(), g1 = w1.grad().to_vector<double>(),
             g2 = w2.grad().to_vector<double>();
  x.set_grad(Tensor());
  w1.set_grad(Tensor());
  w2.set_grad(Tensor());
  Tensor y = checkpoint(block, {x})[0];
  EXPECT_TRUE(y.requires_grad());
  sum(square(y)).backward();
  EXPECT_EQ(x.grad().to_vector<double>(), gx);
  EXPECT_EQ(w1.grad().to_vector<double>(), g1);
  EXPECT_EQ(w2.grad().to_vector<double>(), g2);
}

TEST(Checkpoint, ReplaysRandomDraws) {
  // fn draws noise from the default generator; the recomputation must draw the same noise.
  Tensor x = randn64({8}, 16);
  auto noisy = [](const std::vector<Tensor>& in) {
    Tensor noise = randn(in[0].shape(), default_generator(), 0, 1, DType::kF64);
    return std::vector<Tensor>{mul(in[0], noise)};
  };
  default_generator().set_state({99, 0});
  Tensor y = checkpoint(noisy, {x})[0];
  const GeneratorState after = default_generator().state();
  sum(y).backward();
  EXPECT_EQ(default_generator().state(), after)
      << "backward must leave the generator where the forward left it";
  default_generator().set_state({99, 0});
  Tensor noise = randn({8}, default_generator(), 0, 1, DType::kF64);
  EXPECT_EQ(x.grad().to_vector<double>(), noise.to_vector<double>());
}

TEST(Checkpoint, WithoutGradModeJustRuns) {
  NoGradGuard guard;
  Tensor x = randn64({2}, 17, 1.0, false);
  Tensor y = checkpoint(
      [](const std::vector<Tensor>& in) { return std::vector<Tensor>{exp(in[0])}; }, {x})[0];
  EXPECT_FALSE(y.requires_grad());
}

}  // namespace
}  // namespace hydra

namespace hydra {
namespace {

// An op y = 2 x whose backward adds its part into x's gradient sum when the engine offers one
// (gradient_sum_target), and says whether it was offered.
Tensor doubled(const Tensor& x, bool* offered) {
  Tensor y = mul(x.detach(), 2.0);
  const Shape& shape = x.shape();
  record_op("doubled", {x}, {y}, [=](const std::vector<Tensor>& g) {
    Tensor t = gradient_sum_target(0, shape, g[0].dtype(), g[0].device());
    *offered = t.defined();
    if (!t.defined()) return std::vector<Tensor>{mul(g[0], 2.0)};
    t.add_(mul(g[0], 2.0));
    return std::vector<Tensor>{t};
  });
  return y;
}

// The engine offers an input's gradient summed so far only when it holds it alone: after another
// op's fresh gradient (x * 3) it is offered and the op adds into it; after a gradient passed
// through unchanged (x + ...: the same tensor also reaches the op itself) it is not. Both sums are
// right.
TEST(Engine, OffersAGradientSumOnlyWhenItHoldsItAlone) {
  for (const bool through : {false, true}) {
    Tensor x = randn64({3, 4}, 31, 1.0, true);
    bool offered = false;
    const Tensor d = doubled(x, &offered);  // created first: its backward runs last
    Tensor y = through ? add(d, x) : add(d, mul(x, 3.0));
    sum(mul(y, randn64({3, 4}, 32, 1.0, false))).backward();
    EXPECT_EQ(offered, !through) << (through ? "passed through" : "x * 3");
    // Against the same sums without the offer: 2 + 1, or 2 + 3, times the probe.
    const std::vector<double> probe = randn64({3, 4}, 32, 1.0, false).to_vector<double>(),
                              g = x.grad().to_vector<double>();
    for (std::size_t i = 0; i < g.size(); ++i)
      EXPECT_NEAR(g[i], (through ? 3.0 : 5.0) * probe[i], 1e-12) << i;
  }
}

// An op that needs its gradient sum aligned (rms_norm_multi's kernel: 16 bytes) is not offered one
// that starts 8 bytes into its storage: x's sum here is the gradient of a narrow view's backward, a
// view 8 bytes into a fresh tensor of 13 elements (contiguous, held by the engine alone). It is
// offered with no alignment asked, and the sums are right either way.
TEST(Engine, OffersAGradientSumOnlyAtTheAlignmentAsked) {
  for (const std::size_t alignment : {std::size_t{1}, std::size_t{16}}) {
    Tensor x = randn64({3, 4}, 38, 1.0, true);
    bool offered = false;
    Tensor d = mul(x.detach(), 2.0);
    record_op("doubled_aligned", {x}, {d}, [&offered, alignment](const std::vector<Tensor>& g) {
      Tensor t = gradient_sum_target(0, {3, 4}, g[0].dtype(), g[0].device(), alignment);
      offered = t.defined();
      if (!t.defined()) return std::vector<Tensor>{mul(g[0], 2.0)};
      t.add_(mul(g[0], 2.0));
      return std::vector<Tensor>{t};
    });
    Tensor shifted = mul(x.detach(), 3.0);
    record_op("shifted", {x}, {shifted}, [](const std::vector<Tensor>& g) {
      Tensor base = Tensor::empty({13}, g[0].dtype(), g[0].device());
      Tensor out = base.narrow(0, 1, 12).view({3, 4});
      out.copy_(mul(g[0], 3.0));
      return std::vector<Tensor>{out};  // base goes: out holds its storage alone
    });
    const Tensor probe = randn64({3, 4}, 39, 1.0, false);
    sum(mul(add(d, shifted), probe)).backward();
    EXPECT_EQ(offered, alignment == 1) << "alignment " << alignment;
    const std::vector<double> p = probe.to_vector<double>(), g = x.grad().to_vector<double>();
    for (std::size_t i = 0; i < g.size(); ++i) EXPECT_NEAR(g[i], 5.0 * p[i], 1e-12) << i;
  }
}

// Through a flat view (Node::flat_view): an op reading x.view(...) is offered x's gradient sum in
// its own shape when the view has no other reader, and the view is then skipped; with a second
// reader of the view the sums go the usual way. Both gradients are right.
TEST(Engine, OffersAGradientSumThroughAFlatView) {
  for (const bool second_reader : {false, true}) {
    Tensor x = randn64({3, 4}, 36, 1.0, true);
    bool offered = false;
    const Tensor v = x.view({12});
    const Tensor d = doubled(v, &offered);  // its backward runs after mul's: x's sum is held
    Tensor y = add(d.view({3, 4}), mul(x, 3.0));
    if (second_reader) y = add(y, v.view({3, 4}));
    const Tensor probe = randn64({3, 4}, 37, 1.0, false);
    sum(mul(y, probe)).backward();
    if (!second_reader) {
      EXPECT_TRUE(offered);  // only through the view: it had no sum of its own
    }
    const std::vector<double> p = probe.to_vector<double>(), g = x.grad().to_vector<double>();
    for (std::size_t i = 0; i < g.size(); ++i)
      EXPECT_NEAR(g[i], (second_reader ? 6.0 : 5.0) * p[i], 1e-12) << i;
  }
}

// linear's backward adds its input gradient into the sum with a GEMM of beta = 1: float64 gradients
// of an input used by linear and by another op, of one used by two linears, and of one that
// linear reads through a view (the sum offered through it).
TEST(Engine, LinearAddsIntoTheGradientSumExactly) {
  const Tensor w1 = randn64({5, 4}, 33), w2 = randn64({6, 4}, 34);
  HYDRA_EXPECT_GRADCHECK(
      [&](const std::vector<Tensor>& in) {
        const Tensor& x = in[0];
        return std::vector<Tensor>{concat({linear(x, in[1]), linear(x, in[2]), mul(x, x)}, 1)};
      },
      (std::vector<Tensor>{randn64({3, 4}, 35), w1, w2}));
  HYDRA_EXPECT_GRADCHECK(
      [&](const std::vector<Tensor>& in) {
        const Tensor& x = in[0];  // [2, 3, 4]
        return std::vector<Tensor>{
            concat({linear(x.view({6, 4}), in[1]), mul(x, x).view({6, 4})}, 1)};
      },
      (std::vector<Tensor>{randn64({2, 3, 4}, 38), w1}));
}

// A slice's and a mean's backward add their parts into the input's gradient summed so far
// (through a chain of views for the slice, as the MoE router's first token; broadcast for the
// mean): float64 gradients, for slice steps of 1 and 2.
TEST(Engine, SliceAndMeanAddIntoTheGradientSum) {
  for (const int64_t step : {1, 2})
    HYDRA_EXPECT_GRADCHECK(
        [&](const std::vector<Tensor>& in) {
          const Tensor& x = in[0];  // [2, 3, 4]
          const Tensor first = x.view({6, 4}).view({3, 2, 4}).slice(0, 1, 3, step).reshape({-1});
          const Tensor means = mean(x, {1}).reshape({-1});
          return std::vector<Tensor>{concat({first, means, mul(x, x).reshape({-1})}, 0)};
        },
        (std::vector<Tensor>{randn64({2, 3, 4}, 39)}));
}

}  // namespace
}  // namespace hydra
