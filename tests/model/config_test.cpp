#include <gtest/gtest.h>

#include "configs/config_io.h"
#include "model/params.h"
#include "tests/model/model_util.h"
#include "tests/test_util.h"

namespace hydra {
namespace {

Status spec_status(const std::string& model_text) {
  config::RunConfig cfg;
  const Status st = config::parse_text("model { " + model_text + " }", "configs/toy.pbtxt", &cfg);
  if (!st.ok()) return st;
  return model::make_spec(cfg.model(), "configs/toy.pbtxt").status();
}

TEST(ModelConfig, ValidationNamesFileFieldValueAndExpectation) {
  EXPECT_EQ(spec_status("moe { num_experts: 8 max_active: 9 }").message(),
            "configs/toy.pbtxt: model.moe.max_active = 9 must be <= num_experts (8)");
  EXPECT_EQ(spec_status("d_model: 96 sga { num_heads: 5 }").message(),
            "configs/toy.pbtxt: model.sga.num_heads = 5 must divide d_model (96)");
  EXPECT_EQ(spec_status("max_seq_len: 100 moe { chunk: 8 }").message(),
            "configs/toy.pbtxt: model.moe.chunk = 8 must divide max_seq_len (100)");
  EXPECT_EQ(
      spec_status("max_seq_len: 128 moe { chunk: 8 } workspace { chunk: 48 }").message(),
      "configs/toy.pbtxt: model.workspace.chunk = 48 must be >= 1 and divide max_seq_len (128)");
  EXPECT_EQ(spec_status("num_blocks: 4 pkm { after_block: [1, 7] }").message(),
            "configs/toy.pbtxt: model.pkm.after_block = [1, 7] must hold block indices in [0, 4)");
  EXPECT_EQ(spec_status("pkm { n_keys: 8 topk: 9 }").message(),
            "configs/toy.pbtxt: model.pkm.topk = 9 must be in [1, n_keys] (n_keys = 8)");
  EXPECT_EQ(spec_status("ssm { dt_min: 0.5 dt_max: 0.1 }").message(),
            "configs/toy.pbtxt: model.ssm.dt_max = 0.1 must be >= dt_min (0.500000)");
  EXPECT_FALSE(spec_status("vocab_size: 1").ok());
}

// sga.global_stride 0 keeps the first token global (hydra.md section 3): a stride no position below
// max_seq_len reaches, so position 0 alone is global; the dense pattern has none.
TEST(ModelConfig, GlobalStrideZeroLeavesTheFirstTokenGlobal) {
  const model::ModelSpec s =
      testing::spec_from("max_seq_len: 128 sga { global_stride: 0 window: 8 }");
  EXPECT_EQ(s.sga_stride, 128);
  const model::ModelSpec d = testing::spec_from("sga { pattern: DENSE global_stride: 0 }");
  EXPECT_EQ(d.sga_stride, 0);
  // Through the attention op: a query 40 positions on, with a window of 8, still sees key 0 (its
  // value is the only one that is not zero, so the output is not zero only if key 0 is seen).
  const int64_t L = 48;
  const Tensor q = testing::randn64({1, L, 1, 4}, 5, 1.0, false),
               k = testing::randn64({1, L, 1, 4}, 6, 1.0, false);
  std::vector<double> vv(L * 4, 0.0);
  for (int j = 0; j < 4; ++j) vv[j] = 1.0;
  const Tensor v = tensor(vv, {1, L, 1, 4});
  const auto seen = [&](int64_t stride) {
    const std::vector<double> o =
        sparse_attention(q, k, v, AttentionPattern{8, stride}, 0.5).to_vector<double>();
    return std::abs(o[(L - 1) * 4]) > 1e-12;
  };
  EXPECT_TRUE(seen(s.sga_stride));
  EXPECT_FALSE(seen(0)) << "the kernel's stride 0 means no global key";
}

TEST(ModelConfig, TextSyntaxErrorsNameLineAndColumn) {
  config::RunConfig cfg;
  const Status st =
      config::parse_text("model {\n  d_model: 64\n  d_modle: 3\n}", "configs/x.pbtxt", &cfg);
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.message().rfind("configs/x.pbtxt:3:", 0), 0u) << st.message();
  EXPECT_NE(st.message().find("d_modle"), std::string::npos) << st.message();
}

TEST(ModelConfig, OverridesUseReflectionAndRejectUnknownPaths) {
  config::RunConfig cfg;
  ASSERT_TRUE(config::apply_override(&cfg, "model.moe.max_active=3").ok());
  EXPECT_EQ(cfg.model().moe().max_active(), 3);
  ASSERT_TRUE(config::apply_override(&cfg, "model.sga.pattern=DENSE").ok());
  EXPECT_EQ(cfg.model().sga().pattern(), config::SgaConfig::DENSE);
  ASSERT_TRUE(config::apply_override(&cfg, "model.workspace.after_block=[1, 5]").ok());
  EXPECT_EQ(cfg.model().workspace().after_block_size(), 2);
  EXPECT_EQ(cfg.model().workspace().after_block(1), 5);
  ASSERT_TRUE(config::apply_override(&cfg, "data.shards=a.h5,b.h5").ok());
  EXPECT_EQ(cfg.data().shards(1), "b.h5");
  ASSERT_TRUE(config::apply_override(&cfg, "train.lr.lr=3e-4").ok());
  EXPECT_DOUBLE_EQ(cfg.train().lr().lr(), 3e-4);
  const Status bad = config::apply_override(&cfg, "model.moe.max_activ=3");
  EXPECT_NE(bad.message().find("unknown field 'model.moe.max_activ'"), std::string::npos)
      << bad.message();
  EXPECT_NE(bad.message().find("max_active"), std::string::npos) << bad.message();
  EXPECT_FALSE(config::apply_override(&cfg, "model.d_model=abc").ok());
  EXPECT_FALSE(config::apply_override(&cfg, "model.sga.pattern=SPARSE").ok());
  EXPECT_FALSE(config::apply_override(&cfg, "model.d_model.x=1").ok());
  EXPECT_FALSE(config::apply_override(&cfg, "model.d_model").ok());
}

TEST(ModelConfig, ResolvedConfigPrintsEveryDefault) {
  config::RunConfig cfg;
  config::resolve_defaults(&cfg);
  const std::string text = config::to_text(cfg);
  EXPECT_NE(text.find("max_active: 2"), std::string::npos);
  EXPECT_NE(text.find("global_stride: 256"), std::string::npos);
  config::RunConfig back;
  ASSERT_TRUE(config::parse_text(text, "resolved", &back).ok());
  EXPECT_EQ(back.SerializeAsString(), cfg.SerializeAsString());
}

TEST(ShippedConfigs, LandInTheirParameterRanges) {
  const int64_t tiny = model::count_parameters(testing::shipped_spec("tiny"), 256).total;
  const int64_t toy = model::count_parameters(testing::shipped_spec("toy"), 8192).total;
  const int64_t big = model::count_parameters(testing::shipped_spec("hydra-1.6b"), 8192).total;
  const int64_t tf = model::count_parameters(testing::shipped_spec("transformer-toy"), 8192).total;
  EXPECT_LT(tiny, 1'000'000);
  EXPECT_GE(toy, 25'000'000);
  EXPECT_LE(toy, 33'000'000);
  EXPECT_GE(big, 1'550'000'000);
  EXPECT_LE(big, 1'650'000'000);
  EXPECT_LE(std::abs(double(tf - toy)) / double(toy), 0.05);
}

void expect_counts_match_allocation(const model::ModelSpec& spec) {
  const model::ParamTable table = model::count_parameters(spec, spec.max_seq_len);
  auto m = model::build_model(spec, 1);
  EXPECT_EQ(table.total, m->num_parameters());
  // Component by component, by parameter name.
  std::map<std::string, int64_t> by_component;
  for (const auto& p : m->named_parameters()) {
    std::string comp = "norms_gates";
    const std::string& n = p.name;
    auto has = [&](const char* s) { return n.find(s) != std::string::npos; };
    if (n == "embedding")
      comp = "embedding";
    else if (spec.transformer && has(".attn."))
      comp = "attention";
    else if (spec.transformer && has(".ffn."))
      comp = "ffn";
    else if (has(".ssm."))
      comp = "ssm";
    else if (has(".sga."))
      comp = "sga";
    else if (has(".moe."))
      comp = "moe";
    else if (has("workspaces.") && has(".memory."))
      comp = "workspace";
    else if (has("pkms.") && has(".memory."))
      comp = "pkm";
    by_component[comp] += p.tensor.numel();
  }
  for (const auto& row : table.rows)
    EXPECT_EQ(by_component[row.component], row.total) << row.component;
}

TEST(ParamCounts, EqualAllocatedParametersForTinyToyAndTransformer) {
  expect_counts_match_allocation(testing::shipped_spec("tiny"));
  expect_counts_match_allocation(testing::shipped_spec("toy"));
  expect_counts_match_allocation(testing::shipped_spec("transformer-toy"));
  expect_counts_match_allocation(testing::micro_spec());
  std::string silu = testing::kMicroModel;
  silu.replace(silu.find("moe { "), 6, "moe { expert: SILU ");
  expect_counts_match_allocation(testing::spec_from(silu));
  expect_counts_match_allocation(testing::spec_from(testing::micro_text(testing::kMicroSsd)));
  expect_counts_match_allocation(testing::spec_from(testing::micro_text(testing::kMicroPaperSsm)));
  expect_counts_match_allocation(testing::shipped_spec(
      "toy", [](config::ModelConfig* m) { m->mutable_ssm()->set_form(config::SsmConfig::SSD); }));
}

TEST(ModelConfig, DispatchTileAndBlockFfnScheduleFieldsAreChecked) {
  EXPECT_EQ(spec_status("moe { dispatch_tile: 0 }").message(),
            "configs/toy.pbtxt: model.moe.dispatch_tile = 0 must be in [1, 65536]");
  EXPECT_EQ(spec_status("moe { blockffn_period: 0 }").message(),
            "configs/toy.pbtxt: model.moe.blockffn_period = 0 must be >= 1 (optimizer steps)");
  EXPECT_EQ(spec_status("moe { blockffn_cap: 0.5 }").message(),
            "configs/toy.pbtxt: model.moe.blockffn_cap = 0.5 must be >= 1 (the coefficient's "
            "largest multiple of its start)");
  EXPECT_EQ(spec_status("ssm { conv_width: -1 }").message(),
            "configs/toy.pbtxt: model.ssm.conv_width = -1 must be >= 0 (0: no convolution)");
}

TEST(ModelConfig, SsdHeadDimMustDivideTheInnerWidth) {
  EXPECT_EQ(spec_status("d_model: 96 ssm { form: SSD head_dim: 50 }").message(),
            "configs/toy.pbtxt: model.ssm.head_dim = 50 must divide d_inner (192 = expand * "
            "d_model) for the SSD form");
  EXPECT_TRUE(spec_status("d_model: 96 ssm { head_dim: 50 }").ok());  // SELECTIVE ignores it
}

}  // namespace
}  // namespace hydra
