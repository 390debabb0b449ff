#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <map>
#include <numeric>
#include <random>
#include <utility>
#include <vector>

#include "autograd/grad_mode.h"
#include "model/block.h"
#include "model/pkm.h"
#include "model/workspace.h"
#include "tests/model/model_util.h"
#include "tests/test_util.h"

namespace hydra {
namespace {

using testing::micro_spec;
using testing::randn64;

std::vector<Tensor> with_params(const Tensor& x, const Module& m) {
  std::vector<Tensor> in = {x};
  for (const Tensor& p : m.parameters()) in.push_back(p);
  return in;
}

GradcheckOptions sampled(int64_t n = 0) {
  GradcheckOptions o;
  o.atol = 1e-5;
  o.rtol = 1e-4;
  o.max_elements_per_input = n;
  return o;
}

// ---- SSM
// ---------------------------------------------------------------------------------------------

TEST(SsmMixer, GradcheckFloat64) {
  const model::ModelSpec spec = micro_spec();
  model::Init init(1);
  model::SsmMixer ssm(init, spec);
  ssm.to(DType::kF64);
  HYDRA_EXPECT_GRADCHECK(
      [&](const std::vector<Tensor>& in) { return std::vector<Tensor>{ssm.forward(in[0])}; },
      with_params(randn64({2, 7, 8}, 2), ssm), sampled(12));
}

TEST(SsmMixer, TwoHalvesPassingTheStateEqualOnePass) {
  const model::ModelSpec spec = micro_spec();
  model::Init init(3);
  model::SsmMixer ssm(init, spec);
  ssm.to(DType::kF64);
  Tensor x = randn64({2, 13, 8}, 4);
  Generator g(5);
  const Tensor w = randn({2, 13, 8}, g, 0, 1, DType::kF64);
  auto run = [&](bool halves) {
    ssm.zero_grad();
    x.set_grad(Tensor());
    Tensor y;
    if (!halves) {
      y = ssm.forward(x);
    } else {
      model::SsmState mid;
      const Tensor y1 = ssm.forward(x.narrow(1, 0, 6), {}, &mid);
      const Tensor y2 = ssm.forward(x.narrow(1, 6, 7), mid);
      y = concat({y1, y2}, 1);
    }
    sum(mul(y, w)).backward();
    std::vector<std::vector<double>> out = {y.to_vector<double>(), x.grad().to_vector<double>()};
    for (const Tensor& p : ssm.parameters()) out.push_back(p.grad().to_vector<double>());
    return out;
  };
  const auto one = run(false), two = run(true);
  for (std::size_t k = 0; k < one.size(); ++k)
    for (std::size_t i = 0; i < one[k].size(); ++i)
      ASSERT_NEAR(two[k][i], one[k][i], 1e-11) << "entry " << k;
}

TEST(SsmMixer, SegmentShorterThanTheConvWidthCarriesState) {
  const model::ModelSpec spec = micro_spec();  // conv_width 3
  model::Init init(6);
  model::SsmMixer ssm(init, spec);
  ssm.to(DType::kF64);
  const Tensor x = randn64({1, 5, 8}, 7, 1.0, false);
  const auto whole = ssm.forward(x).to_vector<double>();
  model::SsmState s;
  std::vector<Tensor> parts;
  for (int64_t t = 0; t < 5; ++t) {
    model::SsmState next;
    parts.push_back(ssm.forward(x.narrow(1, t, 1), s, &next));
    s = next;
  }
  const auto stepped = concat(parts, 1).to_vector<double>();
  for (std::size_t i = 0; i < whole.size(); ++i) EXPECT_NEAR(stepped[i], whole[i], 1e-12);
}

// ---- SGA
// ---------------------------------------------------------------------------------------------

TEST(SparseGlobalAttentionLayer, GradcheckFloat64) {
  model::Init init(8);
  model::SparseGlobalAttention sga(init, 8, 2, AttentionPattern{3, 4}, 10000.0, 0.3, 0.3);
  sga.to(DType::kF64);
  HYDRA_EXPECT_GRADCHECK(
      [&](const std::vector<Tensor>& in) { return std::vector<Tensor>{sga.forward(in[0], 2)}; },
      with_params(randn64({2, 9, 8}, 9), sga), sampled(10));
}

// ---- MoE
// ---------------------------------------------------------------------------------------------

struct MoeCase {
  model::ModelSpec spec;
  std::unique_ptr<model::ChunkMoE> moe;
};

// The locality loss holds its target constant (stop-gradient), which finite differences cannot see:
// gradient checks switch it off and LocalityLossHoldsTheNextChunkConstant tests it exactly.
MoeCase make_moe(const std::string& moe_text, uint64_t seed, bool locality = true) {
  MoeCase c{
      testing::spec_from(
          "vocab_size: 11 d_model: 6 num_blocks: 1 max_seq_len: 36 workspace { enabled: false } "
          "pkm { enabled: false } moe { " +
          moe_text + " }"),
      nullptr};
  if (!locality) c.spec.cfg.mutable_moe()->set_locality_loss_weight(0);
  model::Init init(seed);
  c.moe = std::make_unique<model::ChunkMoE>(init, c.spec, 0);
  c.moe->to(DType::kF64);
  return c;
}

TEST(ChunkMoE, GradcheckFloat64RoutedWithSharedExpertAndLosses) {
  auto c =
      make_moe("num_experts: 3 d_expert: 5 max_active: 2 chunk: 3 shared_expert: true d_shared: 4",
               10, false);
  HYDRA_EXPECT_GRADCHECK(
      [&](const std::vector<Tensor>& in) {
        model::ForwardContext ctx;
        ctx.collect_stats = false;
        Tensor aux;
        Tensor y = c.moe->forward(in[0], ctx, &aux);
        return std::vector<Tensor>{y, aux};
      },
      with_params(randn64({2, 9, 6}, 11), *c.moe), sampled(10));
}

TEST(ChunkMoE, GradcheckFloat64RoutingOff) {
  auto c = make_moe("num_experts: 2 d_expert: 4 chunk: 2", 12);
  HYDRA_EXPECT_GRADCHECK(
      [&](const std::vector<Tensor>& in) {
        model::ForwardContext ctx;
        ctx.paths.moe_routing = false;
        return std::vector<Tensor>{c.moe->forward(in[0], ctx, nullptr)};
      },
      with_params(randn64({1, 6, 6}, 13), *c.moe), sampled(10));
}

TEST(ChunkMoE, LocalityLossHoldsTheNextChunkConstant) {
  // dL/dz_j = (sigmoid(z_j) - sigmoid(z_{j+1})) / count for j < nC-1; nothing flows into the
  // target.
  Tensor z = testing::randn64({2, 4, 3}, 50, 2.0);
  model::moe_locality_loss(z).backward();
  const auto zv = z.detach().to_vector<double>(), g = z.grad().to_vector<double>();
  const double count = 2 * 3 * 3;
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t j = 0; j < 4; ++j)
      for (int64_t e = 0; e < 3; ++e) {
        const int64_t i = (b * 4 + j) * 3 + e;
        const double expected =
            j < 3 ? (1 / (1 + std::exp(-zv[i])) - 1 / (1 + std::exp(-zv[i + 3]))) / count : 0.0;
        EXPECT_NEAR(g[i], expected, 1e-14);
      }
  EXPECT_EQ(model::moe_locality_loss(z.narrow(1, 0, 1)).item<double>(), 0.0);
}

TEST(ChunkMoE, SparsityLossGradcheckFloat64AndValue) {
  Tensor z = testing::randn64({2, 6, 3}, 51, 2.0);
  HYDRA_EXPECT_GRADCHECK(
      [](const std::vector<Tensor>& in) {
        return std::vector<Tensor>{model::moe_sparsity_loss(in[0], 2)};
      },
      {z});
  // Value: 1 - prod(1 - p) over pairs of chunks, averaged.
  const auto zv = z.detach().to_vector<double>();
  double total = 0;
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t g = 0; g < 3; ++g)
      for (int64_t e = 0; e < 3; ++e) {
        double prod = 1;
        for (int64_t j = 2 * g; j < 2 * g + 2; ++j)
          prod *= 1 - 1 / (1 + std::exp(-zv[(b * 6 + j) * 3 + e]));
        total += 1 - prod;
      }
  EXPECT_NEAR(model::moe_sparsity_loss(z, 2).item<double>(), total / 18, 1e-14);
}

// Independent reference: router by hand, top-max_active among positive scores, every token of a
// chunk through its chunk's experts, weighted by r.
std::vector<double> moe_reference(const model::ChunkMoE& moe, const Tensor& x, int64_t E,
                                  int64_t max_active, int64_t c, bool prev_mean,
                                  std::vector<uint8_t>* active_out) {
  const int64_t B = x.size(0), L = x.size(1), d = x.size(2), nC = L / c, de = moe.w1.size(1);
  const auto xv = x.to_vector<double>(), rw = moe.router_weight.to_vector<double>(),
             rn = moe.router_norm.to_vector<double>(), w1 = moe.w1.to_vector<double>(),
             w3 = moe.w3.to_vector<double>(), w2 = moe.w2.to_vector<double>();
  std::vector<double> out(B * L * d, 0.0);
  active_out->assign(B * nC * E, 0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < nC; ++j) {
      std::vector<double> rin(d, 0.0);
      if (prev_mean && j > 0) {
        for (int64_t t = (j - 1) * c; t < j * c; ++t)
          for (int64_t k = 0; k < d; ++k) rin[k] += xv[(b * L + t) * d + k] / double(c);
      } else {
        const int64_t t = prev_mean ? 0 : j * c;
        for (int64_t k = 0; k < d; ++k) rin[k] = xv[(b * L + t) * d + k];
      }
      std::vector<double> s(E), r(E);
      double ss = 0;
      for (int64_t e = 0; e < E; ++e) {
        double v = 0;
        for (int64_t k = 0; k < d; ++k) v += rw[e * d + k] * rin[k];
        s[e] = std::max(v, 0.0);
        ss += s[e] * s[e];
      }
      const double rs = 1.0 / std::sqrt(ss / double(E) + 1e-6);
      for (int64_t e = 0; e < E; ++e) r[e] = s[e] * rs * rn[e];
      std::vector<int64_t> order(E);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(),
                       [&](int64_t a, int64_t bb) { return r[a] > r[bb]; });
      for (int64_t k = 0; k < max_active; ++k)
        if (s[order[k]] > 0) (*active_out)[(b * nC + j) * E + order[k]] = 1;
      for (int64_t e = 0; e < E; ++e) {
        if (!(*active_out)[(b * nC + j) * E + e]) continue;
        for (int64_t t = j * c; t < (j + 1) * c; ++t) {
          const double* xt = xv.data() + (b * L + t) * d;
          std::vector<double> h(de);
          for (int64_t i = 0; i < de; ++i) {
            double a1 = 0, a3 = 0;
            for (int64_t k = 0; k < d; ++k) {
              a1 += w1[(e * de + i) * d + k] * xt[k];
              a3 += w3[(e * de + i) * d + k] * xt[k];
            }
            h[i] = a1 / (1 + std::exp(-a1)) * a3;
          }
          for (int64_t k = 0; k < d; ++k) {
            double y = 0;
            for (int64_t i = 0; i < de; ++i) y += w2[(e * d + k) * de + i] * h[i];
            out[(b * L + t) * d + k] += r[e] * y;
          }
        }
      }
    }
  return out;
}

TEST(ChunkMoE, ChunkRoutingMatchesAHandWrittenReference) {
  for (const char* mode : {"PREV_CHUNK_MEAN", "FIRST_TOKEN"}) {
    auto c = make_moe(
        std::string("num_experts: 4 d_expert: 5 max_active: 2 chunk: 4 router_input: ") + mode, 14);
    const Tensor x = randn64({2, 12, 6}, 15, 1.0, false);
    model::ForwardContext ctx;
    const auto got = c.moe->forward(x, ctx, nullptr).to_vector<double>();
    std::vector<uint8_t> active;
    const auto ref =
        moe_reference(*c.moe, x, 4, 2, 4, std::string(mode) == "PREV_CHUNK_MEAN", &active);
    for (std::size_t i = 0; i < ref.size(); ++i)
      ASSERT_NEAR(got[i], ref[i], 1e-12) << mode << " at " << i;
    EXPECT_EQ(c.moe->last_routing().active, active) << mode;
  }
}

TEST(ChunkMoE, MaxActiveIsRespected) {
  for (int64_t k : {1, 2, 3}) {
    auto c =
        make_moe("num_experts: 5 d_expert: 3 chunk: 2 max_active: " + std::to_string(k), 16 + k);
    model::ForwardContext ctx;
    (void)c.moe->forward(randn64({3, 16, 6}, 20 + k, 1.0, false), ctx, nullptr);
    const auto& r = c.moe->last_routing();
    int64_t most = 0;
    for (int64_t ch = 0; ch < r.batch * r.num_chunks; ++ch) {
      int64_t n = 0;
      for (int64_t e = 0; e < 5; ++e) n += r.active[ch * 5 + e];
      EXPECT_LE(n, k);
      most = std::max(most, n);
    }
    EXPECT_EQ(most, k) << "some chunk should use all " << k << " allowed experts";
    EXPECT_NEAR(ctx.stats.at("moe.0.tls"), model::routing_tls(r), 1e-15);
  }
}

// The routing statistics read the router's host values in their own precision (float or double,
// no conversion) and count with each chunk's bit set: in both precisions they equal the public
// counting functions on the routing the forward kept, and the hand count of chunks with no expert;
// the float model's routing and router statistics equal the double one's.
TEST(ChunkMoE, StatisticsEqualTheRoutingsCountsInFloatAndDouble) {
  for (const int64_t E : {7, 70}) {  // one 64-bit word a chunk's set, and two
    std::map<DType, std::vector<uint8_t>> active;
    std::map<DType, std::map<std::string, double>> stats;
    for (const DType dt : {DType::kF32, DType::kF64}) {
      auto c =
          make_moe("num_experts: " + std::to_string(E) + " d_expert: 3 chunk: 2 max_active: 2", 61);
      c.moe->to(dt);
      model::ForwardContext ctx;
      (void)c.moe->forward(randn64({3, 32, 6}, 62, 1.0, false).to(dt), ctx, nullptr);
      const auto& r = c.moe->last_routing();
      const std::string what = std::string(dtype_name(dt)) + ", " + std::to_string(E) + " experts";
      const int64_t chunks = r.batch * r.num_chunks;
      int64_t empty = 0;
      for (int64_t ch = 0; ch < chunks; ++ch) {
        bool any = false;
        for (int64_t e = 0; e < E; ++e) any = any || r.active[ch * E + e] != 0;
        empty += !any;
      }
      EXPECT_EQ(ctx.stats.at("moe.0.tls"), model::routing_tls(r)) << what;
      EXPECT_EQ(ctx.stats.at("moe.0.cls8"), model::routing_cls(r, 8)) << what;
      EXPECT_EQ(ctx.stats.at("moe.0.empty_chunk_frac"), double(empty) / double(chunks)) << what;
      for (const int64_t w : {1, 2, 4, 8, 16, 32})
        EXPECT_EQ(ctx.stats.at("block.0.moe.cls_kept." + std::to_string(w)),
                  model::routing_cls_aligned(r, w))
            << what << ", window " << w;
      EXPECT_GT(ctx.stats.at("moe.0.router_entropy"), 0.0) << what;
      EXPECT_LE(ctx.stats.at("moe.0.router_entropy"), std::log(double(E)) + 1e-6) << what;
      active[dt] = r.active;
      stats[dt] = ctx.stats;
    }
    EXPECT_EQ(active[DType::kF32], active[DType::kF64]) << E << " experts";
    for (const char* key : {"block.0.moe.tls", "block.0.moe.no_expert_frac", "block.0.moe.cls.4",
                            "moe.0.tls", "moe.0.cls8"})
      EXPECT_EQ(stats[DType::kF32].at(key), stats[DType::kF64].at(key)) << key << ", " << E;
    EXPECT_NEAR(stats[DType::kF32].at("moe.0.router_entropy"),
                stats[DType::kF64].at("moe.0.router_entropy"), 1e-5)
        << E << " experts";
  }
}

// The chunk-level sparsity over every window of L tokens and over aligned windows (the routing
// statistics, computed with bit sets of each chunk's experts) equals counting each window's
// distinct experts one by one, bit for bit: random routings with 5, 9, 64 and 70 experts (one and
// two words), chunks of 1, 3 and 4 tokens, windows of 1 to 9 tokens, and 1 to 16 all at once (from
// the chunks where a chunk is a power of two, from the tokens for 3; 16 is longer than the 7 tokens
// of the chunks of 1).
TEST(ChunkMoE, ChunkSparsityEqualsCountingEachWindow) {
  std::mt19937 rng(7);
  for (const auto& [E, chunk] :
       std::vector<std::pair<int64_t, int64_t>>{{5, 3}, {64, 1}, {70, 3}, {9, 4}}) {
    model::MoeRouting r;
    r.batch = 2;
    r.num_chunks = 7;
    r.chunk = chunk;
    r.num_experts = E;
    for (int64_t i = 0; i < r.batch * r.num_chunks * E; ++i) r.active.push_back(rng() % 3 == 0);
    const int64_t L = r.num_chunks * chunk;
    auto distinct = [&](int64_t b, int64_t t0, int64_t t1) {  // tokens [t0, t1]
      std::vector<bool> seen(E, false);
      int64_t uni = 0;
      for (int64_t c = t0 / chunk; c <= t1 / chunk; ++c)
        for (int64_t e = 0; e < E; ++e)
          if (r.active[(b * r.num_chunks + c) * E + e] && !seen[e]) {
            seen[e] = true;
            ++uni;
          }
      return uni;
    };
    // CLS = 1 - (the distinct experts summed over windows) / (E windows): the sum is an integer.
    for (int64_t w = 1; w <= 9; ++w) {
      int64_t all = 0, aligned = 0, n = 0;
      for (int64_t b = 0; b < r.batch; ++b) {
        for (int64_t t = 0; t + w <= L; ++t, ++n) all += distinct(b, t, t + w - 1);
        for (int64_t k = 0; k < L / w; ++k) aligned += distinct(b, k * w, (k + 1) * w - 1);
      }
      if (w <= L) {
        EXPECT_EQ(model::routing_cls(r, w), 1.0 - double(all) / double(E * n))
            << "E " << E << ", L " << w;
      }
      const int64_t windows = r.batch * (L / w);
      EXPECT_EQ(model::routing_cls_aligned(r, w),
                L / w > 0 ? 1.0 - double(aligned) / double(E * windows) : -1.0)  // -1: none whole
          << "E " << E << ", L " << w;
    }
    // All of BlockFFN's windows at once (pairs of the level below) equal them one by one.
    const std::vector<double> levels = model::routing_cls_aligned_doubling(r, 5);
    for (int64_t i = 0; i < 5; ++i)
      EXPECT_EQ(levels[i], model::routing_cls_aligned(r, int64_t{1} << i))
          << "E " << E << ", " << i;
  }
}

// BlockFFN's CLS(L) over aligned windows, worked by hand: one sequence of 4 chunks of 2 tokens, 4
// experts, chunks active on {0}, {0, 1}, {2}, {}.
TEST(ChunkMoE, AlignedChunkSparsityAsBlockFfnDefinesIt) {
  model::MoeRouting r;
  r.batch = 1;
  r.num_chunks = 4;
  r.chunk = 2;
  r.num_experts = 4;
  r.active = {1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0};
  EXPECT_DOUBLE_EQ(model::routing_tls(r), 0.75);
  EXPECT_DOUBLE_EQ(model::routing_cls_aligned(r, 1), 0.75);              // = TLS
  EXPECT_DOUBLE_EQ(model::routing_cls_aligned(r, 2), 0.75);              // a window is a chunk
  EXPECT_DOUBLE_EQ(model::routing_cls_aligned(r, 4), (0.5 + 0.75) / 2);  // {0, 1} and {2}
  EXPECT_DOUBLE_EQ(model::routing_cls_aligned(r, 8), 0.25);              // {0, 1, 2}
  EXPECT_DOUBLE_EQ(model::routing_cls_aligned(r, 16), -1);               // no whole window
  // A forward logs them per layer from the router's output (before max_active) and after it, and
  // their mean over layers; the cap only removes experts, so the kept TLS is never lower.
  auto c = make_moe("num_experts: 6 d_expert: 3 chunk: 2 max_active: 1", 31);
  model::ForwardContext ctx;
  (void)c.moe->forward(randn64({2, 16, 6}, 32, 1.0, false), ctx, nullptr);
  for (int64_t L : {1, 2, 4, 8, 16}) {
    ASSERT_TRUE(ctx.stats.count("block.0.moe.cls." + std::to_string(L))) << L;
    ASSERT_TRUE(ctx.stats.count("block.0.moe.cls_kept." + std::to_string(L))) << L;
    EXPECT_LE(ctx.stats.at("block.0.moe.cls." + std::to_string(L)),
              ctx.stats.at("block.0.moe.cls_kept." + std::to_string(L)) + 1e-12);
  }
  EXPECT_FALSE(ctx.stats.count("block.0.moe.cls.32")) << "sequences of 16 have no window of 32";
  EXPECT_DOUBLE_EQ(ctx.stats.at("block.0.moe.cls.1"), ctx.stats.at("block.0.moe.tls"));
  EXPECT_DOUBLE_EQ(ctx.stats.at("block.0.moe.tls_kept"), ctx.stats.at("moe.0.tls"));
  EXPECT_LT(ctx.stats.at("block.0.moe.tls"), ctx.stats.at("block.0.moe.tls_kept"))
      << "with 6 experts and a cap of 1 the router fires more than it keeps";
  EXPECT_GE(ctx.stats.at("block.0.moe.no_expert_frac"), 0.0);
}

// Statistics deferred to the forward's end (ForwardContext::defer_stats, as a language model's
// forward runs them) are missing until finish_stats and then equal the ones computed at once, bit
// for bit: the MoE's routing figures, losses and loads.
TEST(ChunkMoE, DeferredStatisticsEqualTheImmediateOnes) {
  auto c = make_moe("num_experts: 6 d_expert: 3 chunk: 2 max_active: 2", 41);
  const Tensor x = randn64({2, 16, 6}, 42, 1.0, false);
  model::ForwardContext now, later;
  later.defer_stats = true;
  (void)c.moe->forward(x, now, nullptr);
  (void)c.moe->forward(x, later, nullptr);
  ASSERT_GT(now.stats.size(), 20u);
  EXPECT_FALSE(later.stats.count("moe.0.tls")) << "read before the forward's end";
  EXPECT_FALSE(later.pending_stats.empty());
  later.finish_stats();
  EXPECT_TRUE(later.pending_stats.empty());
  EXPECT_EQ(later.stats, now.stats);
}

TEST(ChunkMoE, OneExpertWithRoutingOffEqualsADenseSwiGLU) {
  auto c = make_moe("num_experts: 1 d_expert: 7 max_active: 1 chunk: 2", 24);
  const Tensor x = randn64({2, 6, 6}, 25, 1.0, false);
  model::ForwardContext ctx;
  ctx.paths.moe_routing = false;
  const Tensor y = c.moe->forward(x, ctx, nullptr);
  const Tensor dense =
      linear(mul(silu(linear(x, c.moe->w1.select(0, 0))), linear(x, c.moe->w3.select(0, 0))),
             c.moe->w2.select(0, 0));
  EXPECT_LT(testing::max_abs_diff(y, dense), 1e-13);
}

// BlockFFN's non-gated experts (model.moe.expert: SILU): W2 SiLU(W1 x), no W3; routed gradients.
TEST(ChunkMoE, SiluExpertsAreBlockFfnsNonGatedBlocks) {
  auto c = make_moe("num_experts: 1 d_expert: 7 max_active: 1 chunk: 2 expert: SILU", 27);
  EXPECT_FALSE(c.moe->w3.defined());
  const Tensor x = randn64({2, 6, 6}, 28, 1.0, false);
  model::ForwardContext ctx;
  ctx.paths.moe_routing = false;
  const Tensor dense = linear(silu(linear(x, c.moe->w1.select(0, 0))), c.moe->w2.select(0, 0));
  EXPECT_LT(testing::max_abs_diff(c.moe->forward(x, ctx, nullptr), dense), 1e-13);
  auto r = make_moe("num_experts: 3 d_expert: 5 max_active: 2 chunk: 3 expert: SILU", 29, false);
  HYDRA_EXPECT_GRADCHECK(
      [&](const std::vector<Tensor>& in) {
        model::ForwardContext ctx2;
        ctx2.collect_stats = false;
        Tensor aux;
        Tensor y = r.moe->forward(in[0], ctx2, &aux);
        return std::vector<Tensor>{y, aux};
      },
      with_params(randn64({2, 9, 6}, 30), *r.moe), sampled(10));
}

// The fused BlockFFN losses (moe_aux, kernels/moe_aux.h) equal the composed ops they replace
// (model/moe.cpp's reference), values and gradients, in float64: chunks of 1 and 3 tokens, groups
// of 1 and 2 chunks (one chunk left over), with and without the next shard's logits; and pass a
// float64 gradient check in s and r.
TEST(MoeAux, EqualsTheComposedLossesAndGradcheckFloat64) {
  const int64_t B = 2, nC = 5, E = 3;
  const double alpha = 1.3;
  for (int64_t c : {1, 3})
    for (int64_t group : {1, 2})
      for (bool next : {false, true}) {
        SCOPED_TRACE("chunk " + std::to_string(c) + ", group " + std::to_string(group) +
                     (next ? ", z_next" : ""));
        Tensor raw = randn64({B, nC, E}, 50), s = softplus(randn64({B, nC, E}, 51, 1.0, false)),
               r = exp(randn64({B, nC, E}, 52, 0.5, false));
        const Tensor load = softmax(randn64({E}, 53, 1.0, false)),
                     zn = next ? randn64({B, E}, 54, 2.0, false) : Tensor();
        s.set_requires_grad(true);
        r.set_requires_grad(true);
        MoeAuxOptions o;
        o.chunk_len = c;
        o.group = group;
        o.alpha = alpha;
        o.balance_scale = double(E) / double(B * nC);
        o.locality_scale = 1.0 / double(B * (nC * c - 1 + (next ? 1 : 0)) * E);
        o.sparsity_scale = 1.0 / double(B * (nC / group) * E);
        o.weights[0] = 0.5;
        o.weights[1] = 2.0;
        o.weights[2] = 3.0;
        const auto composed = [&](const Tensor& x, const Tensor& sv, const Tensor& rv) {
          const Tensor q = div(rv, add(sum(rv, {2}, true), 1e-5));
          const Tensor p = div(sv, add(sum(sv, {2}, true), 1e-5));
          const Tensor losses[3] = {
              mul(sum(mul(sum(q, {0, 1}), load)), o.balance_scale),
              mul(model::moe_blockffn_locality_sum(affine(x, alpha, 0.0), zn, c), o.locality_scale),
              mul(model::moe_blockffn_sparsity_sum(p, group, c), o.sparsity_scale)};
          std::vector<Tensor> rows;
          for (int k = 0; k < 3; ++k) rows.push_back(mul(losses[k], o.weights[k]).reshape({1}));
          for (int k = 0; k < 3; ++k) rows.push_back(losses[k].reshape({1}));
          return concat(rows, 0).reshape({2, 3});
        };
        const Tensor gout = randn64({2, 3}, 55, 1.0, false);
        const Tensor fused = moe_aux(raw, s, r, load, zn, o);
        sum(mul(fused, gout)).backward();
        const Tensor graw = raw.grad(), gs = s.grad(), gr = r.grad();
        for (const Tensor* t : {&raw, &s, &r}) t->set_grad(Tensor());
        const Tensor want = composed(raw, s, r);
        sum(mul(want, gout)).backward();
        EXPECT_LT(testing::rel_error(fused.detach(), want.detach()), 1e-12);
        EXPECT_LT(testing::rel_error(graw, raw.grad()), 1e-10);
        EXPECT_LT(testing::rel_error(gs, s.grad()), 1e-10);
        EXPECT_LT(testing::rel_error(gr, r.grad()), 1e-10);
        // (Not raw: its locality targets are held constant, which finite differences do not;
        // its gradient is checked against the composed ops above, whose ops are gradchecked.)
        HYDRA_EXPECT_GRADCHECK(
            [&](const std::vector<Tensor>& in) {
              return std::vector<Tensor>{moe_aux(raw.detach(), in[0], in[1], load, zn, o)};
            },
            (std::vector<Tensor>{s, r}));
      }
}

// BlockFFN's losses on chunk-routed probabilities equal the token-level definitions of
// spec/blockffn.md with every token carrying its chunk's values.
TEST(ChunkMoE, BlockFfnLossesEqualTheirTokenLevelDefinitions) {
  const int64_t B = 2, nC = 4, E = 3, c = 3, group = 2;
  const Tensor p = affine(sigmoid(testing::randn64({B, nC, E}, 40, 1.0, false)), 0.3, 0.0);
  const Tensor z = testing::randn64({B, nC, E}, 41, 2.0, false);
  const auto pv = p.to_vector<double>(), zv = z.to_vector<double>();
  double cs = 0, al = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t g = 0; g < nC / group; ++g) {  // 1 - prod over the group's tokens of (1 - p)
        double none = 1;
        for (int64_t t = 0; t < group * c; ++t)
          none *= 1 - pv[(b * nC + g * group + t / c) * E + e] + 1e-5;
        cs += 1 - none;
      }
      for (int64_t t = 1; t < nC * c; ++t) {  // BCE(z_{t-1}, sigmoid(z_t)) over token pairs
        const double zp = zv[(b * nC + (t - 1) / c) * E + e], zt = zv[(b * nC + t / c) * E + e];
        al += std::log1p(std::exp(zp)) - zp / (1 + std::exp(-zt));
      }
    }
  EXPECT_NEAR(model::moe_blockffn_sparsity_sum(p, group, c).item<double>(), cs, 1e-10);
  EXPECT_NEAR(model::moe_blockffn_locality_sum(z, Tensor(), c).item<double>(), al, 1e-10);
  // The objective's defaults: no balance loss, locality 2e-3, sparsification 5e-2.
  auto m = make_moe(
      "num_experts: 3 d_expert: 5 max_active: 2 chunk: 3 objective: BLOCKFFN "
      "sparsity_group: 2",
      42);
  model::ForwardContext ctx;
  Tensor aux;
  (void)m.moe->forward(randn64({2, 12, 6}, 43, 1.0, false), ctx, &aux);
  const auto a = aux.to_vector<double>();
  EXPECT_EQ(a[0], 0.0) << "BlockFFN has no balance loss";
  EXPECT_GT(a[1], 0.0);
  EXPECT_GT(a[2], 0.0);
  EXPECT_DOUBLE_EQ(m.moe->sparsity_coef(), 5e-2);
  // Gradients (without the locality term: its detached targets make its gradient differ from its
  // value's derivative by design, as in the HYDRA objective's check above).
  auto g = make_moe(
      "num_experts: 3 d_expert: 5 max_active: 2 chunk: 3 objective: BLOCKFFN "
      "sparsity_group: 2",
      42, false);
  HYDRA_EXPECT_GRADCHECK(
      [&](const std::vector<Tensor>& in) {
        model::ForwardContext ctx2;
        ctx2.collect_stats = false;
        Tensor aux2;
        Tensor y = g.moe->forward(in[0], ctx2, &aux2);
        return std::vector<Tensor>{y, aux2};
      },
      with_params(randn64({2, 12, 6}, 44), *g.moe), sampled(10));
}

// BlockFFN's adaptive coefficient against a reference written from spec/blockffn.md, on the
// losses the layer reports: hold 4 steps, periods of 2, cap 1.2x the start (tight, so that the cap
// takes part in the reference's ratio).
// The schedule's buffers carry it across a "checkpoint" (copied into a fresh layer mid-ramp).
TEST(ChunkMoE, BlockFfnCoefficientFollowsTheAdaptiveSchedule) {
  const std::string cfg =
      "num_experts: 3 d_expert: 5 max_active: 2 chunk: 3 objective: BLOCKFFN sparsity_group: 2 "
      "blockffn_hold_steps: 4 blockffn_period: 2 blockffn_cap: 1.2";
  auto m = make_moe(cfg, 50);
  auto resumed = make_moe(cfg, 50);
  const int64_t P = 2, hold = 4, steps = 16, resume_at = 9;
  const double init = 5e-2, cap = 1.2;
  // The reference: steps, previous mean, ramp from / to / position, the period's sum.
  double n = 0, prev = 0, from = init, to = init, pos = 0, window = 0, coef = init;
  bool moved = false;
  for (int64_t step = 0; step < steps; ++step) {
    // Inputs scaled up and down so that the loss rises and falls between periods.
    const Tensor x = randn64({2, 12, 6}, 60 + step, step % 3 == 0 ? 0.3 : 2.0, false);
    double lcs = 0;
    for (auto* layer : {&m, &resumed}) {
      if (layer == &resumed && step < resume_at) continue;
      model::ForwardContext ctx;
      Tensor aux;
      (void)layer->moe->forward(x, ctx, &aux);
      lcs = ctx.stats.at("moe.0.sparsity_loss");
      layer->moe->update_sparsity_coef();
    }
    n += 1;
    window += lcs;
    if (pos < P && to != from) {
      pos += 1;
      coef = from + (to - from) * pos / P;
    }
    if (static_cast<int64_t>(n) % P == 0) {
      const double mean = window / P;
      window = 0;
      if (n >= hold + P && prev > 0) {
        double ratio = mean / prev;
        if (ratio > 1) ratio = std::max(1.025, ratio);
        ratio = std::min(cap * init / coef, ratio);
        from = coef;
        to = coef * ratio;
        pos = 0;
      }
      prev = mean;
    }
    moved = moved || coef != init;
    EXPECT_NEAR(m.moe->sparsity_coef(), coef, 1e-12) << "step " << step;
    EXPECT_LE(m.moe->sparsity_coef(), cap * init + 1e-15) << "step " << step;
    if (step + 1 == resume_at) {  // the buffers as a checkpoint holds them
      const auto src = m.moe->named_buffers(), dst = resumed.moe->named_buffers();
      ASSERT_EQ(src.size(), dst.size());
      NoGradGuard ng;
      for (std::size_t i = 0; i < src.size(); ++i) {
        Tensor d = dst[i].second;
        d.copy_(src[i].second);
      }
    }
    if (step >= resume_at) {
      EXPECT_EQ(resumed.moe->sparsity_coef(), m.moe->sparsity_coef()) << "step " << step;
    }
    if (step < hold) {
      EXPECT_EQ(m.moe->sparsity_coef(), init) << "held, step " << step;
    }
  }
  EXPECT_TRUE(moved) << "the schedule never moved the coefficient";
}

TEST(ChunkMoE, CapacityDropsAssignmentsAndBoundsTheLoad) {
  auto c = make_moe("num_experts: 4 d_expert: 3 chunk: 2 max_active: 2 capacity_factor: 0.5", 26);
  model::ForwardContext ctx;
  (void)c.moe->forward(randn64({4, 16, 6}, 27, 1.0, false), ctx, nullptr);
  const auto& r = c.moe->last_routing();
  const int64_t chunks = r.batch * r.num_chunks,
                cap = static_cast<int64_t>(std::ceil(0.5 * chunks * 2 / 4.0));
  int64_t dropped = 0;
  for (int64_t e = 0; e < 4; ++e) {
    int64_t load = 0;
    for (int64_t ch = 0; ch < chunks; ++ch) load += r.active[ch * 4 + e];
    EXPECT_LE(load, cap);
    dropped += r.dropped[e];
  }
  EXPECT_GT(dropped, 0);
  EXPECT_EQ(ctx.stats.at("moe.0.dropped_tokens"), double(dropped * 2));
}

// Routing health in the statistics: a router whose ReLU outputs are all zero (every expert dead, as
// make demo's layers ended) reports every expert dead and every chunk empty; a live one does not.
TEST(ChunkMoE, StatisticsCountDeadExpertsAndEmptyChunks) {
  auto c = make_moe("num_experts: 4 d_expert: 3 chunk: 2 max_active: 2", 31);
  const Tensor x = add(mul(randn64({2, 8, 6}, 32, 1.0, false), 0.1), 1.0);  // positive inputs
  {
    model::ForwardContext ctx;
    (void)c.moe->forward(x, ctx, nullptr);
    EXPECT_LT(ctx.stats.at("moe.0.dead_experts"), 4.0);
    EXPECT_LT(ctx.stats.at("moe.0.empty_chunk_frac"), 1.0);
  }
  {
    NoGradGuard no_grad;
    c.moe->router_weight.fill_(-0.5);  // with positive inputs every pre-activation is negative
  }
  model::ForwardContext ctx;
  (void)c.moe->forward(x, ctx, nullptr);
  EXPECT_EQ(ctx.stats.at("moe.0.dead_experts"), 4.0);
  EXPECT_EQ(ctx.stats.at("moe.0.empty_chunk_frac"), 1.0);
  EXPECT_EQ(ctx.stats.at("moe.0.active_per_chunk"), 0.0);
}

TEST(ChunkMoE, SparsityCoefficientMovesTowardTheTarget) {
  auto c = make_moe(
      "num_experts: 4 d_expert: 3 chunk: 2 max_active: 2 target_sparsity: 0.9 sparsity_adapt_rate: "
      "0.1",
      28);
  model::ForwardContext ctx;
  (void)c.moe->forward(randn64({2, 8, 6}, 29, 1.0, false), ctx, nullptr);
  const double before = c.moe->sparsity_coef();
  c.moe->update_sparsity_coef();  // TLS <= 0.75 < 0.9: raise
  EXPECT_NEAR(c.moe->sparsity_coef(), before * std::exp(0.1), 1e-12);
}

// ---- memories
// ----------------------------------------------------------------------------------------

// The micro model with the workspace's write as given (SERIAL or PARALLEL).
model::ModelSpec workspace_spec(const std::string& write) {
  std::string text = testing::kMicroModel;
  const std::string at = "attn_dim: 4 ";
  text.replace(text.find(at), at.size(), at + "write: " + write + " ");
  return testing::spec_from(text);
}

class WorkspaceWrite : public ::testing::TestWithParam<std::string> {};
INSTANTIATE_TEST_SUITE_P(WorkspaceMemoryLayer, WorkspaceWrite,
                         ::testing::Values("SERIAL", "PARALLEL"));

TEST_P(WorkspaceWrite, GradcheckFloat64) {
  const model::ModelSpec spec = workspace_spec(GetParam());
  model::Init init(30);
  model::WorkspaceMemory ws(init, spec, 0);
  ws.to(DType::kF64);
  HYDRA_EXPECT_GRADCHECK(
      [&](const std::vector<Tensor>& in) {
        model::ForwardContext ctx;
        ctx.collect_stats = false;
        return std::vector<Tensor>{ws.forward(in[0], ctx)};
      },
      with_params(randn64({2, 16, 8}, 31), ws), sampled(8));
}

// The fused attention kernels and the explicit GEMM + softmax path (heads wider than 128) compute
// the same function: outputs and every gradient agree to rounding.
TEST_P(WorkspaceWrite, FusedAndExplicitAttentionAgree) {
  const model::ModelSpec spec = workspace_spec(GetParam());
  model::Init init(34);
  model::WorkspaceMemory ws(init, spec, 0);
  ws.to(DType::kF64);
  std::vector<std::vector<double>> runs;
  for (const bool fused : {true, false}) {
    ws.set_fused_attention(fused);
    ws.zero_grad();
    Tensor x = randn64({2, 24, 8}, 35);
    model::ForwardContext ctx;
    const Tensor y = ws.forward(x, ctx);
    sum(mul(y, randn64(y.shape(), 36, 1.0, false))).backward();
    std::vector<double> all = y.to_vector<double>();
    for (const Tensor& g : {x.grad()}) {
      const auto v = g.to_vector<double>();
      all.insert(all.end(), v.begin(), v.end());
    }
    for (const auto& p : ws.named_parameters()) {
      const auto v = p.tensor.grad().to_vector<double>();
      all.insert(all.end(), v.begin(), v.end());
    }
    runs.push_back(all);
  }
  ASSERT_EQ(runs[0].size(), runs[1].size());
  for (std::size_t i = 0; i < runs[0].size(); ++i) EXPECT_NEAR(runs[0][i], runs[1][i], 1e-12) << i;
}

TEST_P(WorkspaceWrite, SegmentsPassingTheSlotsEqualOnePass) {
  const model::ModelSpec spec = workspace_spec(GetParam());
  model::Init init(32);
  model::WorkspaceMemory ws(init, spec, 0);
  ws.to(DType::kF64);
  const Tensor x = randn64({2, 24, 8}, 33, 1.0, false);
  model::ForwardContext ctx;
  const auto whole = ws.forward(x, ctx).to_vector<double>();
  Tensor slots;
  const Tensor a = ws.forward(x.narrow(1, 0, 16), ctx, Tensor(), &slots);
  const Tensor b = ws.forward(x.narrow(1, 16, 8), ctx, slots);
  const auto split_run = concat({a, b}, 1).to_vector<double>();
  for (std::size_t i = 0; i < whole.size(); ++i) EXPECT_NEAR(split_run[i], whole[i], 1e-12);
}

// The two writes differ only in where the write queries come from (S_j or S_0). With write_q's
// weight zero the queries are its bias in both, so SERIAL (a chain of gated_update launches) and
// PARALLEL (one batched attention and gated_scan) must compute the same function: outputs, slots
// after the last chunk and every gradient agree to rounding. With the weight non-zero they must
// differ (the test can fail).
TEST(WorkspaceMemoryLayer, ParallelWriteEqualsSerialWhenQueriesIgnoreTheSlots) {
  std::vector<std::vector<double>> runs;
  for (const bool zero_q : {true, false}) {
    for (const char* write : {"SERIAL", "PARALLEL"}) {
      model::Init init(38);
      model::WorkspaceMemory ws(init, workspace_spec(write), 0);
      ws.to(DType::kF64);
      if (zero_q) ws.write_q->weight.detach().zero_();
      Tensor x = randn64({2, 24, 8}, 39);
      model::ForwardContext ctx;
      Tensor last;
      const Tensor y = ws.forward(x, ctx, Tensor(), &last);
      sum(add(sum(mul(y, randn64(y.shape(), 40, 1.0, false))),
              sum(mul(last, randn64(last.shape(), 41, 1.0, false)))))
          .backward();
      std::vector<double> all = y.to_vector<double>();
      for (const Tensor& t : {last, x.grad()}) {
        const auto v = t.to_vector<double>();
        all.insert(all.end(), v.begin(), v.end());
      }
      for (const auto& p : ws.named_parameters()) {
        if (p.name.find("write_q.weight") != std::string::npos) continue;
        const auto v = p.tensor.grad().to_vector<double>();
        all.insert(all.end(), v.begin(), v.end());
      }
      runs.push_back(all);
    }
  }
  ASSERT_EQ(runs[0].size(), runs[1].size());
  double diff = 0;
  for (std::size_t i = 0; i < runs[0].size(); ++i) EXPECT_NEAR(runs[0][i], runs[1][i], 1e-12) << i;
  for (std::size_t i = 0; i < runs[2].size(); ++i)
    diff = std::max(diff, std::abs(runs[2][i] - runs[3][i]));
  EXPECT_GT(diff, 1e-6) << "with slot-dependent queries the two writes should differ";
}

TEST(ProductKeyMemoryLayer, TopkOverProductKeysEqualsBruteForce) {
  const int64_t H = 2, T = 7, n = 9, half = 3, k = 4;
  const Tensor q1 = randn64({H, T, half}, 34, 1.0, false),
               q2 = randn64({H, T, half}, 35, 1.0, false);
  const Tensor k1 = randn64({H, n, half}, 36, 1.0, false),
               k2 = randn64({H, n, half}, 37, 1.0, false);
  const model::PkmLookup look = model::pkm_lookup(q1, q2, k1, k2, k);
  const auto s1 = matmul(q1, k1.transpose(1, 2)).to_vector<double>(),
             s2 = matmul(q2, k2.transpose(1, 2)).to_vector<double>();
  const auto scores = look.scores.to_vector<double>();
  const auto idx = look.indices.to_vector<int64_t>();
  for (int64_t r = 0; r < H * T; ++r) {
    std::vector<std::pair<double, int64_t>> all;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) all.push_back({s1[r * n + i] + s2[r * n + j], i * n + j});
    std::stable_sort(all.begin(), all.end(),
                     [](const auto& a, const auto& b) { return a.first > b.first; });
    for (int64_t j = 0; j < k; ++j) {
      EXPECT_NEAR(scores[r * k + j], all[j].first, 1e-12);
      EXPECT_EQ(idx[r * k + j], all[j].second);
    }
  }
}

// The lookup searches only the cells (i, j) with (i + 1)(j + 1) <= k of the grid of the halves'
// top-k sums; it must pick what the full grid's top-k picks, in its order, ties included (scores on
// a grid of 0.5, so many sums are equal).
TEST(ProductKeyMemoryLayer, PrunedGridPicksWhatTheFullGridPicks) {
  for (int64_t k : {1, 3, 4, 8}) {
    const int64_t H = 2, T = 11, n = 12, half = 2;
    const auto coarse = [](const Tensor& t) {
      std::vector<double> v = t.to_vector<double>();
      for (double& x : v) x = std::round(x * 2) / 2;
      return tensor(v, t.shape());
    };
    const Tensor q1 = coarse(randn64({H, T, half}, 40 + k, 1.0, false)),
                 q2 = coarse(randn64({H, T, half}, 50 + k, 1.0, false));
    const Tensor k1 = coarse(randn64({H, n, half}, 60 + k, 1.0, false)),
                 k2 = coarse(randn64({H, n, half}, 70 + k, 1.0, false));
    const model::PkmLookup look = model::pkm_lookup(q1, q2, k1, k2, k);
    const auto [v1, i1] = topk(matmul(q1, k1.transpose(1, 2)), k);
    const auto [v2, i2] = topk(matmul(q2, k2.transpose(1, 2)), k);
    const auto [scores, ci] = topk(add(v1.unsqueeze(3), v2.unsqueeze(2)).reshape({H, T, k * k}), k);
    EXPECT_EQ(look.scores.to_vector<double>(), scores.to_vector<double>()) << "k " << k;
    EXPECT_EQ(look.indices.to_vector<int64_t>(),
              product_key_indices(i1, i2, ci, n).to_vector<int64_t>())
        << "k " << k;
  }
}

TEST(ProductKeyMemoryLayer, GradcheckFloat64WithSparseValueGradients) {
  const model::ModelSpec spec = micro_spec();
  model::Init init(38);
  model::ProductKeyMemory pkm(init, spec, 0);
  pkm.to(DType::kF64);
  HYDRA_EXPECT_GRADCHECK(
      [&](const std::vector<Tensor>& in) {
        model::ForwardContext ctx;
        ctx.collect_stats = false;
        return std::vector<Tensor>{pkm.forward(in[0], ctx)};
      },
      with_params(randn64({2, 5, 8}, 39), pkm), sampled(10));
}

// ---- block
// -------------------------------------------------------------------------------------------

TEST(HydraBlockLayer, GradcheckFloat64AllPaths) {
  model::ModelSpec spec = micro_spec();
  spec.cfg.mutable_moe()->set_locality_loss_weight(
      0);  // stop-gradient: see LocalityLossHoldsTheNextChunkConstant
  model::Init init(40);
  model::HydraBlock block(init, spec, 1);  // block 1 has SGA (every 2)
  ASSERT_TRUE(block.sga != nullptr);
  block.to(DType::kF64);
  HYDRA_EXPECT_GRADCHECK(
      [&](const std::vector<Tensor>& in) {
        model::ForwardContext ctx;
        ctx.collect_stats = false;
        Tensor aux;
        Tensor y = block.forward(in[0], ctx, &aux);
        return std::vector<Tensor>{y, aux};
      },
      with_params(randn64({2, 8, 8}, 41), block), sampled(6));
}

TEST(HydraBlockLayer, UniformControllerIsTheIdentityMix) {
  // With the controller's weights at zero, c = 1 for every path: the same as no controller.
  const model::ModelSpec spec = micro_spec();
  const model::ModelSpec no_ctrl = micro_spec("block { controller: false }");
  model::Init i1(42), i2(42);
  model::HydraBlock a(i1, spec, 1), b(i2, no_ctrl, 1);
  NoGradGuard ng;
  a.ctrl->weight.zero_();
  const Tensor x = randn64({1, 8, 8}, 43, 1.0, false).to(DType::kF32);
  model::ForwardContext ctx;
  EXPECT_LT(testing::max_abs_diff(a.forward(x, ctx, nullptr), b.forward(x, ctx, nullptr)), 1e-6);
}

// ---- causality, layer by layer
// -------------------------------------------------------------------------------------------
// Each layer on its own: outputs before position t do not move when the inputs from t on change
// (float64, to 1e-12), and the outputs from t on do (the change reaches them). The whole model's
// test (HydraLM.Causal*) would also catch a leak, but not say which layer has it.

void expect_layer_causal(const std::string& name, const std::function<Tensor(const Tensor&)>& f,
                         int64_t B, int64_t L, int64_t d, const std::vector<int64_t>& cuts) {
  NoGradGuard ng;
  const Tensor x = randn64({B, L, d}, 77, 1.0, false);
  const std::vector<double> base = f(x).to_vector<double>();
  const std::vector<double> xv = x.to_vector<double>();
  for (const int64_t t : cuts) {
    std::vector<double> changed = xv;
    const std::vector<double> noise = randn64({B, L, d}, 78 + t, 1.0, false).to_vector<double>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t s = t; s < L; ++s)
        for (int64_t c = 0; c < d; ++c) changed[(b * L + s) * d + c] = noise[(b * L + s) * d + c];
    const std::vector<double> after = f(tensor(changed, {B, L, d})).to_vector<double>();
    ASSERT_EQ(after.size(), base.size()) << name;
    const int64_t dout = static_cast<int64_t>(base.size()) / (B * L);
    double before_t = 0, from_t = 0;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t s = 0; s < L; ++s)
        for (int64_t c = 0; c < dout; ++c) {
          const std::size_t i = static_cast<std::size_t>((b * L + s) * dout + c);
          const double diff = std::abs(after[i] - base[i]);
          if (s < t) {
            before_t = std::max(before_t, diff);
          } else {
            from_t = std::max(from_t, diff);
          }
        }
    EXPECT_LE(before_t, 1e-12) << name << ": an output before position " << t
                               << " changed when only the inputs from " << t << " on did";
    EXPECT_GT(from_t, 1e-9) << name << ": the change at " << t << " reached no output";
  }
}

TEST(LayerCausality, SsmMixerInEachForm) {
  for (const std::string& ssm :
       {std::string("ssm { d_state: 3 conv_width: 3 scan_chunk: 5 dt_rank: 2 }"),
        std::string(testing::kMicroSsd), std::string(testing::kMicroPaperSsm)}) {
    const model::ModelSpec spec = testing::spec_from(testing::micro_text(ssm));
    model::Init init(90);
    model::SsmMixer m(init, spec);
    m.to(DType::kF64);
    // Cuts inside and on the edges of the scan's chunks of 5 and the conv's window of 3.
    expect_layer_causal(ssm, [&](const Tensor& x) { return m.forward(x); }, 2, 23, 8,
                        {0, 1, 4, 5, 6, 12, 22});
  }
}

TEST(LayerCausality, SparseGlobalAttentionWindowAndGlobalKeys) {
  model::Init init(91);
  model::SparseGlobalAttention sga(init, 8, 2, AttentionPattern{3, 4}, 10000.0, 0.3, 0.3);
  sga.to(DType::kF64);
  // Cuts on a global position (multiples of 4), inside and at the edge of the window.
  expect_layer_causal("sga", [&](const Tensor& x) { return sga.forward(x, 0); }, 2, 21, 8,
                      {1, 4, 5, 8, 11, 20});
}

TEST(LayerCausality, ChunkMoEEachRouterInput) {
  for (const char* mode : {"PREV_CHUNK_MEAN", "FIRST_TOKEN"}) {
    MoeCase c = make_moe(std::string("num_experts: 3 d_expert: 6 max_active: 2 chunk: 4 "
                                     "shared_expert: true d_shared: 4 router_input: ") +
                             mode,
                         92);
    // Cuts on a chunk's first token (FIRST_TOKEN routes on it), inside a chunk, and on the last.
    expect_layer_causal(mode,
                        [&](const Tensor& x) {
                          model::ForwardContext ctx;
                          ctx.collect_stats = false;
                          Tensor aux;
                          return c.moe->forward(x, ctx, &aux);
                        },
                        2, 24, 6, {0, 3, 4, 5, 8, 13, 23});
  }
}

TEST(LayerCausality, WorkspaceMemoryEachWrite) {
  for (const char* write : {"SERIAL", "PARALLEL"}) {
    model::Init init(93);
    model::WorkspaceMemory ws(init, workspace_spec(write), 0);
    ws.to(DType::kF64);
    // Chunks of 8: cuts on a chunk's first and last token and inside one. A chunk reads the slots
    // the chunks before it wrote, so a change reaches outputs only when a chunk follows (not from
    // 16 on in 24 tokens).
    expect_layer_causal(write,
                        [&](const Tensor& x) {
                          model::ForwardContext ctx;
                          ctx.collect_stats = false;
                          return ws.forward(x, ctx);
                        },
                        2, 24, 8, {0, 7, 8, 9, 15});
  }
}

TEST(LayerCausality, ProductKeyMemory) {
  const model::ModelSpec spec = micro_spec();
  model::Init init(94);
  model::ProductKeyMemory pkm(init, spec, 0);
  pkm.to(DType::kF64);
  expect_layer_causal("pkm",
                      [&](const Tensor& x) {
                        model::ForwardContext ctx;
                        ctx.collect_stats = false;
                        return pkm.forward(x, ctx);
                      },
                      2, 9, 8, {0, 4, 8});
}

TEST(LayerCausality, HydraBlockAllPaths) {
  const model::ModelSpec spec = micro_spec();
  model::Init init(95);
  model::HydraBlock block(init, spec, 1);  // block 1 has SGA (every 2)
  ASSERT_TRUE(block.sga != nullptr);
  block.to(DType::kF64);
  expect_layer_causal("block",
                      [&](const Tensor& x) {
                        model::ForwardContext ctx;
                        ctx.collect_stats = false;
                        Tensor aux;
                        return block.forward(x, ctx, &aux);
                      },
                      2, 20, 8, {0, 3, 4, 5, 8, 19});
}

}  // namespace
}  // namespace hydra
