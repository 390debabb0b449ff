#include <gtest/gtest.h>

#include <cmath>

#include "autograd/ops.h"
#include "tests/test_util.h"

namespace hydra {
namespace {

using testing::randn64;

TEST(RmsNorm, MatchesReferenceAtOddShape) {
  Tensor x = randn64({7, 13, 5}, 1, 1.0, false), w = randn64({5}, 2, 1.0, false);
  const auto xv = x.to_vector<double>(), wv = w.to_vector<double>();
  const auto y = rms_norm(x, w, 1e-5).to_vector<double>();
  const auto y_nw = rms_norm(x, Tensor(), 1e-5).to_vector<double>();
  for (int r = 0; r < 91; ++r) {
    double ss = 0;
    for (int j = 0; j < 5; ++j) ss += xv[r * 5 + j] * xv[r * 5 + j];
    const double rs = 1 / std::sqrt(ss / 5 + 1e-5);
    for (int j = 0; j < 5; ++j) {
      EXPECT_NEAR(y[r * 5 + j], xv[r * 5 + j] * rs * wv[j], 1e-12);
      EXPECT_NEAR(y_nw[r * 5 + j], xv[r * 5 + j] * rs, 1e-12);
    }
  }
}

TEST(RmsNorm, GradcheckFloat64) {
  Tensor x = randn64({3, 4, 6}, 3), w = randn64({6}, 4);
  HYDRA_EXPECT_GRADCHECK(
      [](const std::vector<Tensor>& in) {
        return std::vector<Tensor>{rms_norm(in[0], in[1], 1e-5)};
      },
      (std::vector<Tensor>{x, w}));
  HYDRA_EXPECT_GRADCHECK(
      [](const std::vector<Tensor>& in) {
        return std::vector<Tensor>{rms_norm(in[0], Tensor(), 1e-5)};
      },
      (std::vector<Tensor>{x}));
}

// Several norms of one input: the outputs equal the single norms' bit for bit, the gradients
// (the input's summed in one pass) within 1e-12, with some outputs given no gradient; gradcheck.
TEST(RmsNorm, MultiEqualsTheSingleNormsAndGradcheckFloat64) {
  const Tensor x0 = randn64({3, 4, 6}, 5, 1.0, false);
  std::vector<Tensor> w0;
  for (int k = 0; k < 4; ++k) w0.push_back(randn64({6}, 6 + k, 1.0, false));
  for (const int count : {1, 3, 4}) {
    for (const bool skip_one : {false, true}) {  // output 0 gets no gradient
      std::vector<std::vector<double>> gx, gws, ys;
      for (const bool multi : {true, false}) {
        Tensor x = x0.clone();
        x.set_requires_grad(true);
        std::vector<Tensor> w;
        for (int k = 0; k < count; ++k) {
          w.push_back(w0[k].clone());
          w.back().set_requires_grad(true);
        }
        std::vector<Tensor> y;
        if (multi) {
          y = rms_norm_multi(x, w, 1e-5);
        } else {
          for (const Tensor& wk : w) y.push_back(rms_norm(x, wk, 1e-5));
        }
        Tensor loss;
        for (int k = skip_one ? 1 : 0; k < count; ++k) {
          const Tensor term = sum(mul(y[k], randn64(y[k].shape(), 20 + k, 1.0, false)));
          loss = loss.defined() ? add(loss, term) : term;
        }
        for (const Tensor& yk : y) ys.push_back(yk.to_vector<double>());
        if (!loss.defined()) continue;
        loss.backward();
        gx.push_back(x.grad().to_vector<double>());
        for (int k = 0; k < count; ++k)
          gws.push_back(w[k].grad().defined() ? w[k].grad().to_vector<double>()
                                              : std::vector<double>(6, 0.0));
      }
      for (int k = 0; k < count; ++k) EXPECT_EQ(ys[k], ys[count + k]) << count << " output " << k;
      if (gx.size() < 2) continue;
      for (std::size_t i = 0; i < gx[0].size(); ++i) EXPECT_NEAR(gx[0][i], gx[1][i], 1e-12) << i;
      for (int k = 0; k < count; ++k)
        for (int j = 0; j < 6; ++j)
          EXPECT_NEAR(gws[k][j], gws[count + k][j], 1e-12) << "weight " << k << " col " << j;
    }
  }
  HYDRA_EXPECT_GRADCHECK(
      [](const std::vector<Tensor>& in) {
        return rms_norm_multi(in[0], {in[1], in[2], in[3]}, 1e-5);
      },
      (std::vector<Tensor>{randn64({3, 4, 6}, 30), randn64({6}, 31), randn64({6}, 32),
                           randn64({6}, 33)}));
  // x also read by a later op (whose gradient the engine holds first): the norm's backward adds
  // its input gradient into that sum (gradient_sum_target).
  HYDRA_EXPECT_GRADCHECK(
      [](const std::vector<Tensor>& in) {
        std::vector<Tensor> ys = rms_norm_multi(in[0], {in[1], in[2]}, 1e-5);
        ys.push_back(mul(in[0], in[0]));
        return ys;
      },
      (std::vector<Tensor>{randn64({3, 4, 6}, 35), randn64({6}, 36), randn64({6}, 37)}));
  EXPECT_THROW((void)rms_norm_multi(x0, {}, 1e-5), Error);
  EXPECT_THROW((void)rms_norm_multi(x0, {w0[0], randn64({5}, 34, 1.0, false)}, 1e-5), Error);
}

// The fused gated update equals its composite (sigmoid of a linear gate over [s; u], then the
// lerp), forward and backward.
TEST(GatedUpdate, EqualsTheCompositeAndGradcheckFloat64) {
  const Tensor s = randn64({3, 5, 7}, 50), u = randn64({3, 5, 7}, 51), w = randn64({1, 14}, 52),
               b = randn64({1}, 53);
  const auto [out, g] = gated_update(s, u, w, b);
  const Tensor g_ref = sigmoid(linear(concat({s, u}, 2), w, b));
  const Tensor out_ref = add(s, mul(g_ref, sub(u, s)));
  EXPECT_LT(testing::rel_error(out, out_ref), 1e-14);
  EXPECT_LT(testing::rel_error(g, g_ref), 1e-14);
  EXPECT_EQ(g.shape(), Shape({3, 5, 1}));
  HYDRA_EXPECT_GRADCHECK(
      [](const std::vector<Tensor>& in) {
        return std::vector<Tensor>{gated_update(in[0], in[1], in[2], in[3]).first};
      },
      (std::vector<Tensor>{s, u, w, b}));
  // A broadcast (non-contiguous) s, as the workspace's first chunk passes its learned slots.
  const Tensor slots = randn64({5, 7}, 54);
  HYDRA_EXPECT_GRADCHECK(
      [](const std::vector<Tensor>& in) {
        return std::vector<Tensor>{
            gated_update(in[0].unsqueeze(0).expand({3, 5, 7}), in[1], in[2], in[3]).first};
      },
      (std::vector<Tensor>{slots, u, w, b}));
}

// The fused combine equals the ops it replaces (x + sum out_i * gate_i * mix_i), gradients
// included, with 1 to 4 paths, with and without the mix, at odd sizes and with rows that span the
// CPU's blocks of 64, and passes a float64 gradient check.
TEST(GatedResidual, EqualsTheCompositeAndGradcheckFloat64) {
  struct Case {
    Shape shape;
    int paths;
    bool mix;
  };
  for (const Case& k :
       {Case{{2, 3, 5}, 1, false}, Case{{2, 3, 5}, 3, true}, Case{{3, 47, 9}, 2, true},
        Case{{1, 70, 13}, 4, false}, Case{{131, 3}, 2, true}}) {
    std::vector<Tensor> in = {randn64(k.shape, 60)};
    for (int i = 0; i < k.paths; ++i) in.push_back(randn64(k.shape, 61 + i));
    for (int i = 0; i < k.paths; ++i) in.push_back(randn64({k.shape.back()}, 71 + i));
    Shape ms = k.shape;
    ms.back() = k.paths;
    if (k.mix) in.push_back(randn64(ms, 80));
    for (Tensor& t : in) t.set_requires_grad(true);
    auto fused = [&](const std::vector<Tensor>& v) {
      const std::vector<Tensor> outs(v.begin() + 1, v.begin() + 1 + k.paths),
          gates(v.begin() + 1 + k.paths, v.begin() + 1 + 2 * k.paths);
      return gated_residual(v[0], outs, gates, k.mix ? v.back() : Tensor());
    };
    auto composite = [&](const std::vector<Tensor>& v) {
      Tensor y = v[0];
      const auto columns =
          k.mix ? split(v.back(), std::vector<int64_t>(k.paths, 1), -1) : std::vector<Tensor>();
      for (int i = 0; i < k.paths; ++i) {
        Tensor term = mul(v[1 + i], v[1 + k.paths + i]);
        if (k.mix) term = mul(term, columns[i]);
        y = add(y, term);
      }
      return y;
    };
    const Tensor w = randn64(k.shape, 90);  // a loss with a gradient that is not all ones
    const Tensor a = fused(in), b = composite(in);
    EXPECT_LT(testing::rel_error(a, b), 1e-13) << shape_str(k.shape) << " paths " << k.paths;
    const auto grads = [&](const Tensor& out) {
      for (const Tensor& t : in) t.set_grad(Tensor());
      sum(mul(out, w)).backward();
      std::vector<Tensor> g;
      for (const Tensor& t : in) g.push_back(t.grad());
      return g;
    };
    const auto ga = grads(a), gb = grads(b);
    for (std::size_t i = 0; i < in.size(); ++i)
      EXPECT_LT(testing::rel_error(ga[i], gb[i]), 1e-12)
          << shape_str(k.shape) << " paths " << k.paths << " input " << i;
    HYDRA_EXPECT_GRADCHECK(
        [&](const std::vector<Tensor>& v) { return std::vector<Tensor>{fused(v)}; }, in);
  }
  // Bad input: a gate of the wrong width, a mix of the wrong width, five paths.
  const Tensor x = randn64({2, 4}, 1), o = randn64({2, 4}, 2);
  EXPECT_THROW(gated_residual(x, {o}, {randn64({3}, 3)}), Error);
  EXPECT_THROW(gated_residual(x, {o}, {randn64({4}, 3)}, randn64({2, 2}, 4)), Error);
  EXPECT_THROW(gated_residual(x, {o, o, o, o, o}, std::vector<Tensor>(5, randn64({4}, 3))), Error);
}

// The fused gated scan equals gated_update applied step after step (the composite it fuses), its
// gradients included, and passes a float64 gradient check (T = 0 too: only h_0, no gate).
TEST(GatedScan, EqualsChainedGatedUpdatesAndGradcheckFloat64) {
  const int64_t T = 4, R = 3, n = 5;
  const Tensor s = randn64({R, n}, 60), u = randn64({T, R, n}, 61), w = randn64({1, 2 * n}, 62),
               b = randn64({1}, 63), up = randn64({T + 1, R, n}, 64, 1.0, false);
  const auto [h, g] = gated_scan(s, u, w, b);
  ASSERT_EQ(h.shape(), Shape({T + 1, R, n}));
  ASSERT_EQ(g.shape(), Shape({T, R}));
  std::vector<Tensor> hs{s.unsqueeze(0)}, gs;
  for (int64_t t = 0; t < T; ++t) {
    auto [next, gt] = gated_update(hs.back().select(0, 0), u.select(0, t), w, b);
    hs.push_back(next.unsqueeze(0));
    gs.push_back(gt.view({1, R}));
  }
  const Tensor h_ref = concat(hs, 0), g_ref = concat(gs, 0);
  EXPECT_LT(testing::rel_error(h, h_ref), 1e-14);
  EXPECT_LT(testing::rel_error(g, g_ref), 1e-14);
  // Gradients of a weighted sum of every state, fused and chained.
  const auto grads = [&](const Tensor& out) {
    for (const Tensor* t : {&s, &u, &w, &b}) t->set_grad(Tensor());
    sum(mul(out, up)).backward();
    return std::vector<Tensor>{s.grad(), u.grad(), w.grad(), b.grad()};
  };
  const auto gf = grads(h), gc = grads(h_ref);
  for (int i = 0; i < 4; ++i) EXPECT_LT(testing::rel_error(gf[i], gc[i]), 1e-12) << "input " << i;
  HYDRA_EXPECT_GRADCHECK(
      [](const std::vector<Tensor>& in) {
        return std::vector<Tensor>{gated_scan(in[0], in[1], in[2], in[3]).first};
      },
      (std::vector<Tensor>{s, u, w, b}));
  const Tensor u0 = randn64({0, R, n}, 65);
  const auto [h0, g0] = gated_scan(s, u0, w, b);
  EXPECT_EQ(h0.shape(), Shape({1, R, n}));
  EXPECT_LT(testing::rel_error(h0.select(0, 0), s), 1e-15);
  HYDRA_EXPECT_GRADCHECK(
      [](const std::vector<Tensor>& in) {
        return std::vector<Tensor>{gated_scan(in[0], in[1], in[2], in[3]).first};
      },
      (std::vector<Tensor>{s, u0, w, b}));
}

TEST(Softmax, MatchesReferenceAtOddShape) {
  Tensor x = randn64({7, 13, 5}, 5, 3.0, false);
  const auto xv = x.to_vector<double>(), s = softmax(x).to_vector<double>(),
             ls = log_softmax(x).to_vector<double>();
  for (int r = 0; r < 91; ++r) {
    double z = 0;
    for (int j = 0; j < 5; ++j) z += std::exp(xv[r * 5 + j]);
    for (int j = 0; j < 5; ++j) {
      EXPECT_NEAR(s[r * 5 + j], std::exp(xv[r * 5 + j]) / z, 1e-12);
      EXPECT_NEAR(ls[r * 5 + j], xv[r * 5 + j] - std::log(z), 1e-12);
    }
  }
}

TEST(Softmax, StableForLargeLogits) {
  Tensor x = tensor<double>({1000, 1001, 999}, {3});
  const auto s = softmax(x).to_vector<double>();
  EXPECT_NEAR(s[1], 1 / (1 + std::exp(-1.0) + std::exp(-2.0)), 1e-12);
}

TEST(Softmax, GradcheckFloat64) {
  Tensor x = randn64({3, 7}, 6);
  HYDRA_EXPECT_GRADCHECK(
      [](const std::vector<Tensor>& in) { return std::vector<Tensor>{softmax(in[0])}; },
      (std::vector<Tensor>{x}));
}

TEST(LogSoftmax, GradcheckFloat64) {
  Tensor x = randn64({3, 7}, 7);
  HYDRA_EXPECT_GRADCHECK(
      [](const std::vector<Tensor>& in) { return std::vector<Tensor>{log_softmax(in[0])}; },
      (std::vector<Tensor>{x}));
}

TEST(CrossEntropy, MatchesReferenceWithIgnoreIndex) {
  Tensor logits = randn64({7, 13}, 8, 2.0, false);
  Tensor targets = tensor<int64_t>({3, -100, 12, 0, 5, -100, 7}, {7});
  const auto lv = logits.to_vector<double>();
  const std::vector<int64_t> tv = targets.to_vector<int64_t>();
  double total = 0;
  int count = 0;
  std::vector<double> rows(7, 0.0);
  for (int r = 0; r < 7; ++r) {
    if (tv[r] == -100) continue;
    double z = 0;
    for (int j = 0; j < 13; ++j) z += std::exp(lv[r * 13 + j]);
    rows[r] = std::log(z) - lv[r * 13 + tv[r]];
    total += rows[r];
    ++count;
  }
  EXPECT_NEAR(cross_entropy(logits, targets).item<double>(), total / count, 1e-12);
  EXPECT_NEAR(cross_entropy(logits, targets, -100, Reduction::kSum).item<double>(), total, 1e-12);
  const auto none = cross_entropy(logits, targets, -100, Reduction::kNone).to_vector<double>();
  for (int r = 0; r < 7; ++r) EXPECT_NEAR(none[r], rows[r], 1e-12);
}

TEST(CrossEntropy, GradcheckFloat64) {
  Tensor logits = randn64({2, 3, 5}, 9);
  Tensor targets = tensor<int32_t>({1, 4, -1, 0, 2, 3}, {2, 3});
  for (Reduction r : {Reduction::kMean, Reduction::kSum, Reduction::kNone}) {
    HYDRA_EXPECT_GRADCHECK(
        [&](const std::vector<Tensor>& in) {
          return std::vector<Tensor>{cross_entropy(in[0], targets, -1, r)};
        },
        (std::vector<Tensor>{logits}));
  }
}

TEST(CrossEntropy, RejectsTargetsOutsideTheVocabulary) {
  try {
    (void)cross_entropy(randn64({2, 4}, 10, 1.0, false), tensor<int64_t>({1, 9}, {2}));
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("target 9"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace hydra
