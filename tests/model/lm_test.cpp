#include <gtest/gtest.h>

#include <chrono>

#include "autograd/compute_copies.h"
#include "autograd/grad_mode.h"
#include "tests/model/model_util.h"
#include "tests/test_util.h"

namespace hydra {
namespace {

using testing::micro_spec;
using testing::random_tokens;

Tensor targets_for(const Tensor& tokens, int64_t vocab, uint64_t seed) {
  Tensor t = random_tokens(vocab, tokens.size(0), tokens.size(1), seed);
  std::vector<int64_t> v = t.to_vector<int64_t>();
  v[1] = model::LanguageModel::kIgnoreIndex;  // one ignored position
  return tensor(v, t.shape());
}

// The whole model's float64 gradient check on `spec` (the micro model and its variants): the loss,
// and the logits when `logits`.
void expect_whole_model_gradcheck(model::ModelSpec spec, bool logits) {
  spec.cfg.mutable_moe()->set_locality_loss_weight(0);  // stop-gradient (tested in ChunkMoE tests)
  auto m = model::build_model(spec, 1);
  m->to(DType::kF64);
  const Tensor tokens = random_tokens(11, 2, 16, 2), targets = targets_for(tokens, 11, 3);
  GradcheckOptions o;
  o.atol = 1e-5;
  o.rtol = 1e-4;
  o.max_elements_per_input = 4;
  HYDRA_EXPECT_GRADCHECK(
      [&](const std::vector<Tensor>&) {
        model::ForwardContext ctx;
        ctx.collect_stats = false;
        const model::LmOutput out = m->forward(tokens, targets, ctx, true);
        return logits ? std::vector<Tensor>{out.loss, out.logits} : std::vector<Tensor>{out.loss};
      },
      m->parameters(), o);
}

TEST(HydraLM, GradcheckFloat64WholeModelAllPaths) {
  expect_whole_model_gradcheck(micro_spec(), true);
}

TEST(HydraLM, GradcheckFloat64WholeModelSsdAndPaperForms) {
  for (const char* ssm : {testing::kMicroSsd, testing::kMicroPaperSsm}) {
    SCOPED_TRACE(ssm);
    expect_whole_model_gradcheck(testing::spec_from(testing::micro_text(ssm)), false);
  }
}

TEST(TransformerLM, GradcheckFloat64) {
  const model::ModelSpec spec = testing::spec_from(
      "kind: TRANSFORMER vocab_size: 9 d_model: 8 num_blocks: 2 max_seq_len: 16 transformer { "
      "num_heads: 2 d_ff: 12 }");
  auto m = model::build_model(spec, 4);
  m->to(DType::kF64);
  const Tensor tokens = random_tokens(9, 2, 7, 5), targets = targets_for(tokens, 9, 6);
  GradcheckOptions o;
  o.max_elements_per_input = 6;
  HYDRA_EXPECT_GRADCHECK(
      [&](const std::vector<Tensor>&) {
        model::ForwardContext ctx;
        return std::vector<Tensor>{m->forward(tokens, targets, ctx, false).loss};
      },
      m->parameters(), o);
}

// Changing tokens after position t must leave the logits at positions <= t untouched, for every
// router input mode, with workspace and PKM on. In float64 with a 1e-10 bound: BLAS rounding may
// differ when later routing changes how many rows an expert's GEMM holds, a leak would be far
// larger.
void expect_causal(const model::ModelSpec& spec, int64_t len,
                   const std::vector<int64_t>& cut_points) {
  auto m = model::build_model(spec, 7);
  m->to(DType::kF64);
  NoGradGuard ng;
  const Tensor tokens = random_tokens(spec.vocab, 2, len, 8);
  model::ForwardContext ctx;
  const std::vector<double> base =
      m->forward(tokens, Tensor(), ctx, true).logits.to_vector<double>();
  const int64_t V = spec.vocab;
  for (int64_t t : cut_points) {
    std::vector<int64_t> changed = tokens.to_vector<int64_t>();
    for (int64_t b = 0; b < 2; ++b)
      for (int64_t s = t + 1; s < len; ++s)
        changed[b * len + s] = (changed[b * len + s] + 1 + s) % V;
    const std::vector<double> after =
        m->forward(tensor(changed, tokens.shape()), Tensor(), ctx, true).logits.to_vector<double>();
    bool later_changed = false;
    for (int64_t b = 0; b < 2; ++b)
      for (int64_t s = 0; s < len; ++s)
        for (int64_t v = 0; v < V; ++v) {
          const int64_t i = (b * len + s) * V + v;
          if (s <= t) {
            ASSERT_NEAR(after[i], base[i], 1e-10)
                << "position " << s << " changed when tokens after " << t << " did";
          } else if (std::abs(after[i] - base[i]) > 1e-6) {
            later_changed = true;
          }
        }
    if (t + 1 < len) {
      EXPECT_TRUE(later_changed) << "the change after " << t << " had no effect at all (len " << len
                                 << ")";
    }
  }
}

TEST(HydraLM, CausalEveryRouterInputModeWithMemories) {
  // Each router input mode, and each workspace write.
  for (const auto& [mode, write] :
       std::vector<std::pair<std::string, std::string>>{{"PREV_CHUNK_MEAN", "SERIAL"},
                                                        {"FIRST_TOKEN", "SERIAL"},
                                                        {"PREV_CHUNK_MEAN", "PARALLEL"}}) {
    const model::ModelSpec spec = testing::spec_from(
        "vocab_size: 256 d_model: 32 num_blocks: 4 max_seq_len: 64 ssm { d_state: 4 } "
        "sga { every: 2 num_heads: 2 window: 9 global_stride: 8 } "
        "moe { num_experts: 4 d_expert: 16 max_active: 2 chunk: 8 router_input: " +
        mode + " } workspace { slots: 4 chunk: 16 num_heads: 2 attn_dim: 16 write: " + write +
        " } pkm { num_heads: 2 k_dim: 8 n_keys: 6 topk: 3 }");
    expect_causal(spec, 64, {0, 7, 8, 15, 16, 31, 40, 62});
  }
}

TEST(HydraLM, CausalTinyConfig) {
  expect_causal(testing::shipped_spec("tiny"), 96, {5, 31, 32, 63, 64});
}

TEST(HydraLM, CausalTinyConfigSsdForm) {
  expect_causal(testing::shipped_spec("tiny",
                                      [](config::ModelConfig* m) {
                                        m->mutable_ssm()->set_form(config::SsmConfig::SSD);
                                        m->mutable_ssm()->set_head_dim(16);
                                      }),
                96, {5, 31, 32, 63, 64});
}

TEST(HydraLM, CausalTinyConfigPaperForm) {
  expect_causal(testing::shipped_spec("tiny",
                                      [](config::ModelConfig* m) {
                                        m->mutable_ssm()->set_d_state(1);
                                        m->mutable_ssm()->set_conv_width(0);
                                      }),
                96, {5, 31, 32, 63, 64});
}

TEST(TransformerLM, Causal) {
  expect_causal(testing::spec_from(
                    "kind: TRANSFORMER vocab_size: 50 d_model: 16 num_blocks: 2 max_seq_len: 64"),
                40, {0, 13, 38});
}

TEST(HydraLM, RecomputationGivesTheSameLossAndGradients) {
  const model::ModelSpec spec = micro_spec();
  auto m = model::build_model(spec, 9);
  m->to(DType::kF64);
  const Tensor tokens = random_tokens(11, 2, 16, 10), targets = targets_for(tokens, 11, 11);
  auto run = [&](bool recompute) {
    m->zero_grad();
    model::ForwardContext ctx;
    ctx.recompute = recompute;
    const model::LmOutput out = m->forward(tokens, targets, ctx);
    out.loss.backward();
    std::vector<std::vector<double>> g = {{out.loss.item<double>()}};
    for (const auto& p : m->named_parameters())
      g.push_back(p.tensor.sparse_grad() ? densify_sparse_grad(p.tensor).to_vector<double>()
                                         : p.tensor.grad().to_vector<double>());
    return std::make_pair(g, ctx.stats);
  };
  const auto [plain, plain_stats] = run(false);
  const auto [recomputed, re_stats] = run(true);
  ASSERT_EQ(plain.size(), recomputed.size());
  for (std::size_t k = 0; k < plain.size(); ++k)
    for (std::size_t i = 0; i < plain[k].size(); ++i)
      ASSERT_NEAR(recomputed[k][i], plain[k][i], 1e-12) << "entry " << k;
  EXPECT_EQ(re_stats.size(), plain_stats.size())
      << "statistics recorded once, not again while recomputing";
}

// The tiled dispatch (moe.dispatch TILED: the experts' GEMMs over padded tiles, no count on the
// host before them) trains like the packed one: the same loss, gradients, statistics and sparsity
// coefficient after an update, with and without recomputation. Tiles of 3 rows leave padding
// rows in most groups.
TEST(HydraLM, TiledDispatchEqualsPackedDispatch) {
  auto run = [&](config::MoeConfig::Dispatch mode, bool recompute) {
    model::ModelSpec spec = micro_spec();
    spec.cfg.mutable_moe()->set_dispatch(mode);
    spec.cfg.mutable_moe()->set_dispatch_tile(3);
    auto m = model::build_model(spec, 9);
    m->to(DType::kF64);
    const Tensor tokens = random_tokens(11, 2, 16, 10), targets = targets_for(tokens, 11, 11);
    model::ForwardContext ctx;
    ctx.recompute = recompute;
    const model::LmOutput out = m->forward(tokens, targets, ctx);
    out.loss.backward();
    m->after_step();  // the sparsity coefficient follows the batch's TLS
    std::vector<std::vector<double>> g = {{out.loss.item<double>()}};
    for (const auto& p : m->named_parameters())
      g.push_back(!p.tensor.grad().defined() && !p.tensor.sparse_grad() ? std::vector<double>{}
                  : p.tensor.sparse_grad() ? densify_sparse_grad(p.tensor).to_vector<double>()
                                           : p.tensor.grad().to_vector<double>());
    for (const auto& [name, b] : m->named_buffers()) g.push_back(b.to_vector<double>());
    return std::make_pair(g, ctx.stats);
  };
  for (bool recompute : {false, true}) {
    SCOPED_TRACE(recompute ? "recompute" : "no recompute");
    const auto [packed, packed_stats] = run(config::MoeConfig::PACKED, recompute);
    const auto [tiled, tiled_stats] = run(config::MoeConfig::TILED, recompute);
    ASSERT_EQ(packed.size(), tiled.size());
    for (std::size_t k = 0; k < packed.size(); ++k) {
      ASSERT_EQ(tiled[k].size(), packed[k].size()) << "entry " << k;
      for (std::size_t i = 0; i < packed[k].size(); ++i)
        ASSERT_NEAR(tiled[k][i], packed[k][i], 1e-12) << "entry " << k << " element " << i;
    }
    ASSERT_EQ(tiled_stats.size(), packed_stats.size());
    for (const auto& [key, v] : packed_stats) EXPECT_NEAR(tiled_stats.at(key), v, 1e-12) << key;
  }
}

// Mixed precision's mechanism on the CPU, with f64 masters and f32 compute copies (bf16 runs on
// CUDA: tests/gpu): the pass computes in the copies' dtype, gradients arrive in the masters' dtype
// (the PKM values' row-sparse ones included), and the masters come back untouched.
TEST(HydraLM, ComputeCopiesComputeInTheirDtypeAndAccumulateInTheMasters) {
  const model::ModelSpec spec = micro_spec();
  auto m = model::build_model(spec, 12);
  m->to(DType::kF64);
  const Tensor tokens = random_tokens(11, 2, 16, 13), targets = targets_for(tokens, 11, 14);
  auto run = [&](ComputeCopies* copies, bool recompute) {
    m->zero_grad();
    double loss = 0;
    DType seen = DType::kF64;
    for (int micro = 0; micro < 2; ++micro) {  // two micro-batches accumulate
      const ComputeCopies::Scope scope(copies);
      seen = m->parameters()[0].dtype();  // the embedding
      model::ForwardContext ctx;
      ctx.recompute = recompute;
      const model::LmOutput out = m->forward(tokens, targets, ctx);
      if (copies != nullptr) {
        // The MoE routers keep their master dtype (keep_master_dtype), and so do the aux losses.
        int routers = 0;
        for (const auto& p : m->named_parameters()) {
          const bool router = p.name.find(".router_") != std::string::npos;
          routers += router;
          EXPECT_EQ(p.tensor.dtype(), router ? DType::kF64 : DType::kF32) << p.name;
        }
        EXPECT_EQ(routers, 2 * spec.num_blocks);
        EXPECT_EQ(out.aux.dtype(), DType::kF64);
      }
      out.loss.backward();
      loss += out.loss.item<double>();
    }
    std::vector<double> g;
    for (const auto& p : m->named_parameters()) {
      const Tensor gp = p.tensor.sparse_grad() ? densify_sparse_grad(p.tensor) : p.tensor.grad();
      EXPECT_EQ(gp.dtype(), DType::kF64) << p.name;
      const std::vector<double> v = gp.to_vector<double>();
      g.insert(g.end(), v.begin(), v.end());
    }
    return std::make_tuple(loss, g, seen);
  };
  std::vector<Tensor> before;
  for (const Tensor& p : m->parameters()) before.push_back(p.clone());
  const auto [loss64, g64, seen64] = run(nullptr, false);
  ComputeCopies copies(*m, DType::kF32);
  for (bool recompute : {false, true}) {
    const auto [loss32, g32, seen32] = run(&copies, recompute);
    EXPECT_EQ(seen32, DType::kF32);
    EXPECT_NEAR(loss32, loss64, 1e-5 * std::abs(loss64));
    double num = 0, den = 0;
    for (std::size_t i = 0; i < g64.size(); ++i) {
      num += (g32[i] - g64[i]) * (g32[i] - g64[i]);
      den += g64[i] * g64[i];
    }
    EXPECT_LT(std::sqrt(num / den), 1e-4) << "recompute " << recompute;
    EXPECT_GT(std::sqrt(num), 0.0) << "the copies computed in f32, not f64";
  }
  EXPECT_EQ(seen64, DType::kF64);
  const std::vector<Tensor> after = m->parameters();
  for (std::size_t i = 0; i < after.size(); ++i) {
    EXPECT_EQ(after[i].dtype(), DType::kF64);
    EXPECT_TRUE(testing::bitwise_equal(after[i], before[i])) << "master " << i << " changed";
  }
  // An update of the masters reaches the copies at the next enter().
  m->parameters()[0].detach().copy_(add(before[0], full(before[0].shape(), 1.0, DType::kF64)));
  copies.enter();
  EXPECT_EQ(m->parameters()[0].to(DType::kF64).to_vector<double>()[0],
            double(float(before[0].to_vector<double>()[0] + 1.0)));
  copies.exit();
  // refresh() casts ahead of enter(), which then reuses the copies; a master changed after the
  // refresh is cast again at enter().
  const auto first_copy = [&] { return m->parameters()[0].to(DType::kF64).to_vector<double>()[0]; };
  copies.refresh();
  m->parameters()[0].detach().copy_(add(before[0], full(before[0].shape(), 2.0, DType::kF64)));
  copies.enter();
  EXPECT_EQ(first_copy(), double(float(before[0].to_vector<double>()[0] + 2.0)));
  copies.exit();
  copies.refresh();
  copies.enter();
  EXPECT_EQ(first_copy(), double(float(before[0].to_vector<double>()[0] + 2.0)));
  copies.exit();
}

TEST(HydraLM, ReportsStatisticsOfEveryComponent) {
  const model::ModelSpec spec = micro_spec();
  auto m = model::build_model(spec, 12);
  model::ForwardContext ctx;
  const Tensor tokens = random_tokens(11, 2, 16, 13);
  (void)m->forward(tokens, tokens, ctx);
  for (const char* key :
       {"moe.0.tls", "moe.1.cls8", "moe.0.load.2", "moe.0.router_entropy", "moe.0.dropped_tokens",
        "workspace.0.write_gate_mean", "workspace.1.slot_entropy", "pkm.0.value_coverage",
        "pkm.0.score_entropy", "block.1.mix.sga", "block.0.gate_norm.ssm", "loss.balance",
        "block.1.moe.cls.8", "block.0.moe.cls_kept.16", "block.0.moe.no_expert_frac", "moe.tls",
        "moe.cls.4"})
    EXPECT_TRUE(ctx.stats.count(key)) << key;
  // The overall figures are the mean over the MoE layers.
  EXPECT_NEAR(ctx.stats.at("moe.cls.4"),
              (ctx.stats.at("block.0.moe.cls.4") + ctx.stats.at("block.1.moe.cls.4")) / 2, 1e-12);
}

TEST(HydraLM, PathsCanBeSwitchedOff) {
  const model::ModelSpec spec = micro_spec();
  auto m = model::build_model(spec, 14);
  const Tensor tokens = random_tokens(11, 1, 16, 15);
  model::ForwardContext ctx;
  ctx.paths = {true, false, false, false, false};  // stage 1: SSM + dense FFN
  const model::LmOutput out = m->forward(tokens, tokens, ctx);
  EXPECT_EQ(out.aux.to_vector<float>(), (std::vector<float>{0, 0, 0}));
  out.loss.backward();
  auto& hm = dynamic_cast<model::HydraLM&>(*m);
  EXPECT_FALSE(hm.blocks->at<model::HydraBlock>(1).sga->qkv->weight.grad().defined());
  EXPECT_TRUE(hm.blocks->at<model::HydraBlock>(1).moe->w1.grad().defined());
  EXPECT_FALSE(hm.blocks->at<model::HydraBlock>(1).moe->router_weight.grad().defined());
}

TEST(ModelSlow, ToyForwardBackwardAtSeq1024OnTheCpu) {
  const model::ModelSpec spec = testing::shipped_spec("toy");
  auto m = model::build_model(spec, 16);
  const Tensor tokens = random_tokens(spec.vocab, 1, 1024, 17);
  model::ForwardContext ctx;
  const auto t0 = std::chrono::steady_clock::now();
  const model::LmOutput out = m->forward(tokens, random_tokens(spec.vocab, 1, 1024, 18), ctx);
  out.loss.backward();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_TRUE(std::isfinite(out.loss.item<float>()));
  EXPECT_NEAR(out.lm_loss.item<float>(), std::log(8192.0), 1.0)
      << "an untrained model is near uniform";
  std::printf("toy forward+backward, batch 1, seq 1024: %.2f s\n", s);
}

}  // namespace
}  // namespace hydra
