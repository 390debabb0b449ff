#include <gtest/gtest.h>

#include <cmath>

#include "autograd/ops.h"
#include "tests/test_util.h"

namespace hydra {
namespace {

using testing::randn64;

double sigm(double v) { return 1 / (1 + std::exp(-v)); }

// ---- causal depthwise conv1d
// ------------------------------------------------------------------------

std::vector<double> conv_ref(const Tensor& x, const Tensor& w, const Tensor& bias,
                             const Tensor& prefix, bool silu) {
  const int64_t B = x.size(0), L = x.size(1), C = x.size(2), W = w.size(1);
  const auto xv = x.to_vector<double>(), wv = w.to_vector<double>();
  const auto bv = bias.defined() ? bias.to_vector<double>() : std::vector<double>(C, 0.0);
  const auto pv = prefix.defined() ? prefix.to_vector<double>() : std::vector<double>();
  std::vector<double> y(B * L * C);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < L; ++t)
      for (int64_t c = 0; c < C; ++c) {
        double acc = bv[c];
        for (int64_t k = 0; k < W; ++k) {
          const int64_t s = t - (W - 1) + k;
          double in = 0;
          if (s >= 0)
            in = xv[(b * L + s) * C + c];
          else if (!pv.empty())
            in = pv[(b * (W - 1) + (W - 1 + s)) * C + c];
          acc += wv[c * W + k] * in;
        }
        y[(b * L + t) * C + c] = silu ? acc * sigm(acc) : acc;
      }
  return y;
}

TEST(CausalConv1d, MatchesReferenceAtOddShape) {
  Tensor x = randn64({3, 13, 7}, 1, 1.0, false), w = randn64({7, 4}, 2, 1.0, false);
  Tensor bias = randn64({7}, 3, 1.0, false), prefix = randn64({3, 3, 7}, 4, 1.0, false);
  for (bool silu : {false, true}) {
    for (bool with_prefix : {false, true}) {
      const Tensor p = with_prefix ? prefix : Tensor();
      const auto got = causal_conv1d(x, w, bias, p, silu).to_vector<double>();
      const auto ref = conv_ref(x, w, bias, p, silu);
      for (std::size_t i = 0; i < ref.size(); ++i) ASSERT_NEAR(got[i], ref[i], 1e-12);
    }
  }
}

TEST(CausalConv1d, GradcheckFloat64) {
  HYDRA_EXPECT_GRADCHECK(
      [](const std::vector<Tensor>& in) {
        return std::vector<Tensor>{causal_conv1d(in[0], in[1], in[2], in[3], true)};
      },
      (std::vector<Tensor>{randn64({2, 5, 3}, 5), randn64({3, 4}, 6), randn64({3}, 7),
                           randn64({2, 3, 3}, 8)}));
  HYDRA_EXPECT_GRADCHECK(
      [](const std::vector<Tensor>& in) {
        return std::vector<Tensor>{causal_conv1d(in[0], in[1], Tensor())};
      },
      (std::vector<Tensor>{randn64({1, 6, 2}, 9), randn64({2, 3}, 10)}));
}

// x may be a part of a wider tensor's rows (the SSM's in_proj output, split): read in place, with
// the same output and gradients, bit for bit, as its contiguous copy; and a gradcheck through it.
TEST(CausalConv1d, RowsApartEqualTheContiguousCopy) {
  for (const int64_t B : {1, 3}) {
    const Tensor wide = randn64({B, 13, 11}, 14), w = randn64({7, 4}, 15), b = randn64({7}, 16);
    Tensor copy = wide.detach().narrow(2, 2, 7).contiguous();
    copy.set_requires_grad(true);
    const Tensor apart = wide.narrow(2, 2, 7);
    ASSERT_FALSE(apart.is_contiguous());
    const Tensor ya = causal_conv1d(apart, w, b, Tensor(), true);
    const Tensor gy = randn64({B, 13, 7}, 17, 1.0, false);
    ya.backward(gy);
    const std::vector<double> gw = w.grad().to_vector<double>(), gb = b.grad().to_vector<double>();
    w.set_grad(Tensor());
    b.set_grad(Tensor());
    const Tensor yc = causal_conv1d(copy, w, b, Tensor(), true);
    yc.backward(gy);
    EXPECT_EQ(ya.to_vector<double>(), yc.to_vector<double>());
    EXPECT_EQ(wide.grad().narrow(2, 2, 7).contiguous().to_vector<double>(),
              copy.grad().to_vector<double>());
    EXPECT_EQ(gw, w.grad().to_vector<double>());
    EXPECT_EQ(gb, b.grad().to_vector<double>());
  }
  HYDRA_EXPECT_GRADCHECK(
      [](const std::vector<Tensor>& in) {
        return std::vector<Tensor>{
            causal_conv1d(in[0].narrow(2, 1, 3), in[1], in[2], in[3].narrow(2, 0, 3), true)};
      },
      (std::vector<Tensor>{randn64({2, 5, 6}, 18), randn64({3, 4}, 19), randn64({3}, 20),
                           randn64({2, 3, 5}, 21)}));
}

TEST(CausalConv1d, TwoSegmentsWithPrefixEqualOnePass) {
  Tensor x = randn64({2, 11, 3}, 11, 1.0, false), w = randn64({3, 4}, 12, 1.0, false),
         b = randn64({3}, 13, 1.0, false);
  const auto whole = causal_conv1d(x, w, b, Tensor(), true).to_vector<double>();
  Tensor first = causal_conv1d(x.narrow(1, 0, 6), w, b, Tensor(), true);
  Tensor second = causal_conv1d(x.narrow(1, 6, 5), w, b, x.narrow(1, 3, 3), true);
  const auto joined = concat({first, second}, 1).to_vector<double>();
  for (std::size_t i = 0; i < whole.size(); ++i) EXPECT_NEAR(joined[i], whole[i], 1e-14);
}

// ---- selective scan
// ---------------------------------------------------------------------------------

struct ScanInputs {
  Tensor u, delta, A_log, B, C, D, dt_bias, z, h0;
  std::vector<Tensor> list() const { return {u, delta, A_log, B, C, D, dt_bias, z, h0}; }
};

ScanInputs scan_inputs(int64_t Bsz, int64_t L, int64_t Dm, int64_t N, uint64_t seed, bool grad) {
  ScanInputs s;
  s.u = randn64({Bsz, L, Dm}, seed + 1, 1.0, grad);
  s.delta = randn64({Bsz, L, Dm}, seed + 2, 1.0, grad);
  s.A_log = randn64({Dm, N}, seed + 3, 0.5, grad);
  s.B = randn64({Bsz, L, N}, seed + 4, 1.0, grad);
  s.C = randn64({Bsz, L, N}, seed + 5, 1.0, grad);
  s.D = randn64({Dm}, seed + 6, 1.0, grad);
  s.dt_bias = randn64({Dm}, seed + 7, 0.5, grad);
  s.z = randn64({Bsz, L, Dm}, seed + 8, 1.0, grad);
  s.h0 = randn64({Bsz, Dm, N}, seed + 9, 1.0, grad);
  return s;
}

// The recurrence of spec/algorithms.md section 1, step by step in double.
void scan_ref(const ScanInputs& s, std::vector<double>& y, std::vector<double>& h_last) {
  const int64_t Bsz = s.u.size(0), L = s.u.size(1), Dm = s.u.size(2), N = s.A_log.size(1);
  const auto u = s.u.to_vector<double>(), dl = s.delta.to_vector<double>(),
             Al = s.A_log.to_vector<double>();
  const auto Bv = s.B.to_vector<double>(), Cv = s.C.to_vector<double>(),
             Dv = s.D.to_vector<double>();
  const auto bias = s.dt_bias.to_vector<double>(), z = s.z.to_vector<double>(),
             h0 = s.h0.to_vector<double>();
  y.assign(Bsz * L * Dm, 0.0);
  h_last.assign(Bsz * Dm * N, 0.0);
  for (int64_t b = 0; b < Bsz; ++b)
    for (int64_t d = 0; d < Dm; ++d) {
      std::vector<double> h(h0.begin() + (b * Dm + d) * N, h0.begin() + (b * Dm + d + 1) * N);
      for (int64_t t = 0; t < L; ++t) {
        const int64_t r = b * L + t;
        const double delta = std::log1p(std::exp(dl[r * Dm + d] + bias[d]));
        double acc = 0;
        for (int64_t n = 0; n < N; ++n) {
          h[n] = std::exp(delta * -std::exp(Al[d * N + n])) * h[n] +
                 delta * Bv[r * N + n] * u[r * Dm + d];
          acc += Cv[r * N + n] * h[n];
        }
        acc += Dv[d] * u[r * Dm + d];
        y[r * Dm + d] = acc * z[r * Dm + d] * sigm(z[r * Dm + d]);
      }
      for (int64_t n = 0; n < N; ++n) h_last[(b * Dm + d) * N + n] = h[n];
    }
}

SelectiveScanResult run_scan(const std::vector<Tensor>& in, int64_t chunk_len) {
  return selective_scan(in[0], in[1], in[2], in[3], in[4], in[5], in[6], in[7], in[8], chunk_len);
}

TEST(SelectiveScan, MatchesRecurrenceAtOddShape) {
  const ScanInputs s = scan_inputs(2, 13, 7, 5, 100, false);
  std::vector<double> y_ref, h_ref;
  scan_ref(s, y_ref, h_ref);
  for (int64_t chunk : {1, 4, 64}) {
    const SelectiveScanResult r = run_scan(s.list(), chunk);
    const auto y = r.y.to_vector<double>(), h = r.h_last.to_vector<double>();
    for (std::size_t i = 0; i < y_ref.size(); ++i)
      ASSERT_NEAR(y[i], y_ref[i], 1e-12) << "chunk " << chunk;
    for (std::size_t i = 0; i < h_ref.size(); ++i)
      ASSERT_NEAR(h[i], h_ref[i], 1e-12) << "chunk " << chunk;
  }
}

TEST(SelectiveScan, GradcheckFloat64) {
  // L = 5 with chunks of 2: the backward crosses two chunk boundaries and a partial last chunk.
  const ScanInputs s = scan_inputs(2, 5, 3, 2, 200, true);
  HYDRA_EXPECT_GRADCHECK(
      [](const std::vector<Tensor>& in) {
        const SelectiveScanResult r = run_scan(in, 2);
        return std::vector<Tensor>{r.y, r.h_last};
      },
      s.list());
}

TEST(SelectiveScan, GradcheckFloat64WithoutOptionalInputs) {
  const ScanInputs s = scan_inputs(1, 6, 4, 3, 300, true);
  HYDRA_EXPECT_GRADCHECK(
      [](const std::vector<Tensor>& in) {
        const SelectiveScanResult r = selective_scan(in[0], in[1], in[2], in[3], in[4], Tensor(),
                                                     Tensor(), Tensor(), Tensor(), 4);
        return std::vector<Tensor>{r.y};
      },
      (std::vector<Tensor>{s.u, s.delta, s.A_log, s.B, s.C}));
}

TEST(SelectiveScan, TwoHalvesPassingTheStateEqualOnePass) {
  const ScanInputs s = scan_inputs(2, 12, 5, 4, 400, true);
  Generator gen(5);
  const Tensor wy = randn({2, 12, 5}, gen, 0, 1, DType::kF64),
               wh = randn({2, 5, 4}, gen, 0, 1, DType::kF64);
  auto grads = [&](bool split_run) {
    for (const Tensor& t : s.list()) t.set_grad(Tensor());
    Tensor y, h;
    if (!split_run) {
      const SelectiveScanResult r = run_scan(s.list(), 4);
      y = r.y;
      h = r.h_last;
    } else {
      auto part = [&](const Tensor& t, int64_t a, int64_t n) { return t.narrow(1, a, n); };
      const SelectiveScanResult r1 =
          selective_scan(part(s.u, 0, 7), part(s.delta, 0, 7), s.A_log, part(s.B, 0, 7),
                         part(s.C, 0, 7), s.D, s.dt_bias, part(s.z, 0, 7), s.h0, 4);
      const SelectiveScanResult r2 =
          selective_scan(part(s.u, 7, 5), part(s.delta, 7, 5), s.A_log, part(s.B, 7, 5),
                         part(s.C, 7, 5), s.D, s.dt_bias, part(s.z, 7, 5), r1.h_last, 4);
      y = concat({r1.y, r2.y}, 1);
      h = r2.h_last;
    }
    add(sum(mul(y, wy)), sum(mul(h, wh))).backward();
    std::vector<std::vector<double>> out = {y.to_vector<double>(), h.to_vector<double>()};
    for (const Tensor& t : s.list()) out.push_back(t.grad().to_vector<double>());
    return out;
  };
  const auto whole = grads(false), halves = grads(true);
  for (std::size_t k = 0; k < whole.size(); ++k)
    for (std::size_t i = 0; i < whole[k].size(); ++i)
      ASSERT_NEAR(halves[k][i], whole[k][i], 1e-11) << "entry " << k;
}

TEST(SelectiveScan, StridedSlicesOfProjectionsNeedNoCopyAndMatch) {
  // u and z are the halves of an in_proj output; B and C slices of an x_proj output (as in the
  // model).
  const int64_t Bsz = 2, L = 9, Dm = 6, N = 3, R = 2;
  Tensor xz = randn64({Bsz, L, 2 * Dm}, 1, 1.0, false),
         proj = randn64({Bsz, L, R + 2 * N}, 2, 1.0, false);
  Tensor delta = randn64({Bsz, L, Dm}, 3, 1.0, false), A_log = randn64({Dm, N}, 4, 0.5, false);
  Tensor u = xz.narrow(2, 0, Dm), z = xz.narrow(2, Dm, Dm), Bm = proj.narrow(2, R, N),
         Cm = proj.narrow(2, R + N, N);
  const auto strided = selective_scan(u, delta, A_log, Bm, Cm, Tensor(), Tensor(), z, Tensor())
                           .y.to_vector<double>();
  const auto packed = selective_scan(u.contiguous(), delta, A_log, Bm.contiguous(), Cm.contiguous(),
                                     Tensor(), Tensor(), z.contiguous(), Tensor())
                          .y.to_vector<double>();
  EXPECT_EQ(strided, packed);
}

TEST(SelectiveScan, GradientsDoNotDependOnChunkLength) {
  const ScanInputs s = scan_inputs(1, 11, 3, 2, 500, true);
  auto grads = [&](int64_t chunk) {
    for (const Tensor& t : s.list()) t.set_grad(Tensor());
    sum(run_scan(s.list(), chunk).y).backward();
    std::vector<double> all;
    for (const Tensor& t : s.list()) {
      const auto g = t.grad().to_vector<double>();
      all.insert(all.end(), g.begin(), g.end());
    }
    return all;
  };
  const auto g1 = grads(1), g3 = grads(3), g64 = grads(64);
  for (std::size_t i = 0; i < g1.size(); ++i) {
    EXPECT_NEAR(g3[i], g1[i], 1e-12);
    EXPECT_NEAR(g64[i], g1[i], 1e-12);
  }
}

TEST(SelectiveScan, ShapeErrorsNameTheInput) {
  const ScanInputs s = scan_inputs(1, 4, 3, 2, 600, false);
  try {
    (void)selective_scan(s.u, s.delta, s.A_log, s.B.narrow(1, 0, 3), s.C, s.D, s.dt_bias, s.z,
                         s.h0);
    FAIL() << "no error";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("selective_scan: B has shape [1, 3, 2], expected [1, 4, 2]"),
              std::string::npos)
        << msg;
  }
}

// ---- the SSD form (Mamba-2): one decay rate per head
// ----------------------------------------------------------

// The SSD scan's inputs, and the same recurrence written for selective_scan: A_log, delta and
// dt_bias repeated over each head's P channels (and A_log over the N states).
struct SsdInputs {
  Tensor u, delta, A_log, B, C, D, dt_bias, z, h0;  // delta [B, L, H]; A_log, dt_bias [H]
  std::vector<Tensor> list() const { return {u, delta, A_log, B, C, D, dt_bias, z, h0}; }
};

SsdInputs ssd_inputs(int64_t Bsz, int64_t L, int64_t H, int64_t P, int64_t N, uint64_t seed,
                     bool grad) {
  SsdInputs s;
  const int64_t Dm = H * P;
  s.u = randn64({Bsz, L, Dm}, seed + 1, 1.0, grad);
  s.delta = randn64({Bsz, L, H}, seed + 2, 1.0, grad);
  s.A_log = randn64({H}, seed + 3, 0.5, grad);
  s.B = randn64({Bsz, L, N}, seed + 4, 1.0, grad);
  s.C = randn64({Bsz, L, N}, seed + 5, 1.0, grad);
  s.D = randn64({Dm}, seed + 6, 1.0, grad);
  s.dt_bias = randn64({H}, seed + 7, 0.5, grad);
  s.z = randn64({Bsz, L, Dm}, seed + 8, 1.0, grad);
  s.h0 = randn64({Bsz, Dm, N}, seed + 9, 1.0, grad);
  return s;
}

SelectiveScanResult ssd_as_selective(const std::vector<Tensor>& in, int64_t chunk_len) {
  const int64_t Bsz = in[0].size(0), L = in[0].size(1), Dm = in[0].size(2), H = in[2].size(0),
                P = Dm / H, N = in[3].size(2);
  const Tensor A_log = in[2].view({H, 1, 1}).expand({H, P, N}).reshape({Dm, N});
  const Tensor delta = in[1].unsqueeze(3).expand({Bsz, L, H, P}).reshape({Bsz, L, Dm});
  const Tensor bias = in[6].unsqueeze(1).expand({H, P}).reshape({Dm});
  return selective_scan(in[0], delta, A_log, in[3], in[4], in[5], bias, in[7], in[8], chunk_len);
}

SelectiveScanResult run_ssd(const std::vector<Tensor>& in, int64_t chunk_len) {
  return ssd_scan(in[0], in[1], in[2], in[3], in[4], in[5], in[6], in[7], in[8], chunk_len);
}

TEST(SsdScan, EqualsTheSelectiveScanWithOneRatePerHead) {
  // L = 13: chunks of 4 and 5 leave a partial last chunk; 1 and 13 are the extremes, 64 > L.
  const SsdInputs s = ssd_inputs(2, 13, 3, 2, 5, 700, false);
  const SelectiveScanResult ref = ssd_as_selective(s.list(), 4);
  const auto y_ref = ref.y.to_vector<double>(), h_ref = ref.h_last.to_vector<double>();
  for (int64_t chunk : {1, 4, 5, 13, 64}) {
    const SelectiveScanResult r = run_ssd(s.list(), chunk);
    ASSERT_EQ(r.y.shape(), ref.y.shape());
    ASSERT_EQ(r.h_last.shape(), ref.h_last.shape());
    const auto y = r.y.to_vector<double>(), h = r.h_last.to_vector<double>();
    for (std::size_t i = 0; i < y_ref.size(); ++i)
      ASSERT_NEAR(y[i], y_ref[i], 1e-11) << "chunk " << chunk << " y[" << i << "]";
    for (std::size_t i = 0; i < h_ref.size(); ++i)
      ASSERT_NEAR(h[i], h_ref[i], 1e-11) << "chunk " << chunk << " h_last[" << i << "]";
  }
}

TEST(SsdScan, WithoutOptionalInputsEqualsTheSelectiveScan) {
  const SsdInputs s = ssd_inputs(1, 9, 2, 3, 4, 710, false);
  const SelectiveScanResult r =
      ssd_scan(s.u, s.delta, s.A_log, s.B, s.C, Tensor(), Tensor(), Tensor(), Tensor(), 4);
  const int64_t Dm = 6;
  const Tensor A_log = s.A_log.view({2, 1, 1}).expand({2, 3, 4}).reshape({Dm, 4});
  const Tensor delta = s.delta.unsqueeze(3).expand({1, 9, 2, 3}).reshape({1, 9, Dm});
  const SelectiveScanResult ref =
      selective_scan(s.u, delta, A_log, s.B, s.C, Tensor(), Tensor(), Tensor(), Tensor(), 4);
  const auto y = r.y.to_vector<double>(), y_ref = ref.y.to_vector<double>();
  for (std::size_t i = 0; i < y_ref.size(); ++i) ASSERT_NEAR(y[i], y_ref[i], 1e-11);
  const auto h = r.h_last.to_vector<double>(), h_ref = ref.h_last.to_vector<double>();
  for (std::size_t i = 0; i < h_ref.size(); ++i) ASSERT_NEAR(h[i], h_ref[i], 1e-11);
}

TEST(SsdScan, GradcheckFloat64) {
  // L = 7 with chunks of 3: two chunk boundaries and a padded last chunk.
  const SsdInputs s = ssd_inputs(2, 7, 2, 2, 3, 720, true);
  HYDRA_EXPECT_GRADCHECK(
      [](const std::vector<Tensor>& in) {
        const SelectiveScanResult r = run_ssd(in, 3);
        return std::vector<Tensor>{r.y, r.h_last};
      },
      s.list());
}

TEST(SsdScan, GradientsEqualTheSelectiveScans) {
  const SsdInputs s = ssd_inputs(2, 11, 2, 3, 4, 730, true);
  Generator gen(7);
  const Tensor wy = randn({2, 11, 6}, gen, 0, 1, DType::kF64),
               wh = randn({2, 6, 4}, gen, 0, 1, DType::kF64);
  auto grads = [&](bool ssd) {
    for (const Tensor& t : s.list()) t.set_grad(Tensor());
    const SelectiveScanResult r = ssd ? run_ssd(s.list(), 4) : ssd_as_selective(s.list(), 4);
    add(sum(mul(r.y, wy)), sum(mul(r.h_last, wh))).backward();
    std::vector<std::vector<double>> out;
    for (const Tensor& t : s.list()) out.push_back(t.grad().to_vector<double>());
    return out;
  };
  const auto a = grads(true), b = grads(false);
  for (std::size_t k = 0; k < a.size(); ++k)
    for (std::size_t i = 0; i < a[k].size(); ++i)
      ASSERT_NEAR(a[k][i], b[k][i], 1e-10) << "input " << k << " entry " << i;
}

// The fused kernels (what ssd_scan runs) against the same form composed of ops: outputs and every
// gradient, f64, with every optional input and without, chunks that do not divide the length.
TEST(SsdScan, FusedKernelsEqualTheComposedForm) {
  for (const bool full : {true, false})
    for (const int64_t chunk : {1, 3, 8, 64}) {
      const SsdInputs s = ssd_inputs(2, 19, 3, 4, 5, 750 + chunk, true);
      std::vector<Tensor> in = s.list();
      if (!full) in[5] = in[6] = in[7] = in[8] = Tensor();
      Generator gen(11);
      const Tensor wy = randn({2, 19, 12}, gen, 0, 1, DType::kF64),
                   wh = randn({2, 12, 5}, gen, 0, 1, DType::kF64);
      auto run = [&](bool fused) {
        for (const Tensor& t : in)
          if (t.defined()) t.set_grad(Tensor());
        const SelectiveScanResult r =
            fused ? ssd_scan(in[0], in[1], in[2], in[3], in[4], in[5], in[6], in[7], in[8], chunk)
                  : ssd_scan_composed(in[0], in[1], in[2], in[3], in[4], in[5], in[6], in[7], in[8],
                                      chunk);
        add(sum(mul(r.y, wy)), sum(mul(r.h_last, wh))).backward();
        std::vector<std::vector<double>> out = {r.y.to_vector<double>(),
                                                r.h_last.to_vector<double>()};
        for (const Tensor& t : in)
          if (t.defined()) out.push_back(t.grad().to_vector<double>());
        return out;
      };
      const auto a = run(true), b = run(false);
      ASSERT_EQ(a.size(), b.size());
      for (std::size_t k = 0; k < a.size(); ++k)
        for (std::size_t i = 0; i < a[k].size(); ++i)
          ASSERT_NEAR(a[k][i], b[k][i], 1e-10)
              << "full " << full << " chunk " << chunk << " result " << k << " entry " << i;
    }
}

TEST(SsdScan, StridedSlicesOfProjectionsMatchPackedInputs) {
  // u and z are the halves of an in_proj output; B and C slices of an x_proj output (as in the
  // model), whose length is a whole number of chunks (no padding copies them).
  const int64_t Bsz = 2, L = 8, H = 2, P = 3, Dm = H * P, N = 3, R = 2;
  Tensor xz = randn64({Bsz, L, 2 * Dm}, 1, 1.0, false),
         proj = randn64({Bsz, L, R + 2 * N}, 2, 1.0, false);
  Tensor delta = randn64({Bsz, L, H}, 3, 1.0, false), A_log = randn64({H}, 4, 0.5, false);
  Tensor u = xz.narrow(2, 0, Dm), z = xz.narrow(2, Dm, Dm), Bm = proj.narrow(2, R, N),
         Cm = proj.narrow(2, R + N, N);
  const auto strided =
      ssd_scan(u, delta, A_log, Bm, Cm, Tensor(), Tensor(), z, Tensor(), 4).y.to_vector<double>();
  const auto packed = ssd_scan(u.contiguous(), delta, A_log, Bm.contiguous(), Cm.contiguous(),
                               Tensor(), Tensor(), z.contiguous(), Tensor(), 4)
                          .y.to_vector<double>();
  EXPECT_EQ(strided, packed);
}

TEST(SsdScan, ShapeErrorsNameTheInput) {
  const SsdInputs s = ssd_inputs(1, 4, 2, 3, 2, 740, false);
  auto message = [&](auto&& call) {
    try {
      call();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(message([&] {
              (void)ssd_scan(s.u, s.delta.narrow(2, 0, 1), s.A_log, s.B, s.C, s.D, s.dt_bias, s.z,
                             s.h0);
            }).find("ssd_scan: delta has shape [1, 4, 1], expected [1, 4, 2]"),
            std::string::npos);
  EXPECT_NE(message([&] {
              (void)ssd_scan(s.u, s.delta, randn64({4}, 1, 1.0, false), s.B, s.C, s.D, s.dt_bias,
                             s.z, s.h0);
            }).find("must be [H] with H dividing u's 6 channels"),
            std::string::npos);
}

}  // namespace
}  // namespace hydra
