// Sampling and generation (trainer/generation.h): the sampler draws from the distribution it
// promises, greedy generation picks what the full forward ranks first at every position, and bad
// requests are refused with the option named.
#include "trainer/generation.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <vector>

#include "autograd/grad_mode.h"
#include "tests/model/model_util.h"

namespace hydra {
namespace {

using trainer::SamplingOptions;

TEST(Sampling, GreedyTakesTheLargestLogitAndTheLowestIdOnTies) {
  data::Rng rng({1});
  EXPECT_EQ(trainer::sample_token({0.1f, 2.0f, -1.0f, 2.0f}, {.temperature = 0}, rng), 1);
  // Top-k 1 and a tiny top-p are greedy at any temperature.
  for (int i = 0; i < 20; ++i) {
    EXPECT_EQ(trainer::sample_token({0.1f, 2.0f, -1.0f, 1.9f}, {.temperature = 5, .top_k = 1}, rng),
              1);
    EXPECT_EQ(
        trainer::sample_token({0.1f, 2.0f, -1.0f, 1.9f}, {.temperature = 5, .top_p = 1e-6}, rng),
        1);
  }
}

// Frequencies over 40,000 draws against softmax(logits / T) renormalised over the kept tokens:
// the binomial standard error is at most 0.0025, so 0.012 is about five of them.
void expect_frequencies(const std::vector<float>& logits, const SamplingOptions& o,
                        const std::vector<double>& expected) {
  data::Rng rng({o.seed});
  std::vector<double> count(logits.size(), 0.0);
  const int n = 40000;
  for (int i = 0; i < n; ++i) count[trainer::sample_token(logits, o, rng)] += 1;
  for (std::size_t v = 0; v < logits.size(); ++v)
    EXPECT_NEAR(count[v] / n, expected[v], 0.012) << "token " << v;
}

TEST(Sampling, DrawsFromTheTemperedTopKTopPDistribution) {
  const std::vector<float> logits = {1.0f, 0.0f, 2.0f, -1.0f};
  auto softmax_of = [](std::vector<double> z) {
    double s = 0;
    for (double& v : z) s += v = std::exp(v);
    for (double& v : z) v /= s;
    return z;
  };
  // Temperature 2 over all four.
  expect_frequencies(logits, {.temperature = 2, .seed = 3}, softmax_of({0.5, 0.0, 1.0, -0.5}));
  // Top-k 2: tokens 2 and 0 only.
  const auto two = softmax_of({1.0, 2.0});
  expect_frequencies(logits, {.temperature = 1, .top_k = 2, .seed = 4}, {two[0], 0, two[1], 0});
  // Top-p 0.8: p = (0.244, 0.090, 0.665, 0.033) keeps 2 and 0 (0.665 < 0.8 <= 0.909).
  expect_frequencies(logits, {.temperature = 1, .top_p = 0.8, .seed = 5}, {two[0], 0, two[1], 0});
}

TEST(Sampling, TheSameSeedDrawsTheSameTokens) {
  const std::vector<float> logits = {0.3f, 0.1f, 0.2f, 0.0f, 0.25f};
  data::Rng a({9}), b({9}), c({10});
  std::vector<int32_t> x, y, z;
  for (int i = 0; i < 64; ++i) {
    x.push_back(trainer::sample_token(logits, {}, a));
    y.push_back(trainer::sample_token(logits, {}, b));
    z.push_back(trainer::sample_token(logits, {}, c));
  }
  EXPECT_EQ(x, y);
  EXPECT_NE(x, z);
}

TEST(Sampling, OutOfRangeOptionsNameTheFlag) {
  EXPECT_NE(trainer::check_sampling({.temperature = -1}).message().find("--temperature"),
            std::string::npos);
  EXPECT_NE(trainer::check_sampling({.temperature = NAN}).message().find("--temperature"),
            std::string::npos);
  EXPECT_NE(trainer::check_sampling({.top_k = -2}).message().find("--top-k"), std::string::npos);
  EXPECT_NE(trainer::check_sampling({.top_p = 0}).message().find("--top-p"), std::string::npos);
  EXPECT_NE(trainer::check_sampling({.top_p = 1.5}).message().find("--top-p"), std::string::npos);
  EXPECT_TRUE(trainer::check_sampling({}).ok());
}

model::ModelSpec byte_model() {
  return testing::spec_from(
      "vocab_size: 256 d_model: 16 num_blocks: 2 max_seq_len: 64 ssm { d_state: 4 } "
      "sga { every: 2 num_heads: 2 window: 5 global_stride: 4 } "
      "moe { num_experts: 4 d_expert: 16 max_active: 2 chunk: 4 } "
      "workspace { slots: 3 chunk: 8 num_heads: 2 attn_dim: 8 } "
      "pkm { num_heads: 2 k_dim: 8 n_keys: 6 topk: 3 }");
}

// Greedy generation equals the full forward's top-1 at every position: one forward over the prompt
// and the generated tokens (padded to whole chunks; causality keeps the padding out).
TEST(Generate, GreedyTokensAreTheFullForwardsTopChoiceAtEveryPosition) {
  const model::ModelSpec spec = byte_model();
  auto m = model::build_model(spec, 5);
  const data::ByteTokenizer bytes;
  const std::vector<int32_t> prompt = bytes.encode("C xkcdq|");
  trainer::GenerateOptions o;
  o.max_new_tokens = 30;
  o.sampling.temperature = 0;
  auto g = trainer::generate(*m, {}, Device::cpu(), bytes, prompt, o);
  ASSERT_TRUE(g.ok()) << g.status().message();
  ASSERT_EQ(g->tokens.size(), 1u);
  const std::vector<int32_t>& out = g->tokens[0];
  ASSERT_EQ(out.size(), 30u);
  EXPECT_EQ(g->ended_by[0], "length");
  EXPECT_EQ(g->text[0], bytes.decode(out));
  EXPECT_EQ(g->prompt_tokens, 8);
  EXPECT_EQ(g->decode_steps, 29);

  std::vector<int64_t> seq(prompt.begin(), prompt.end());
  seq.insert(seq.end(), out.begin(), out.end());
  seq.resize(40, 0);  // whole workspace chunks
  NoGradGuard ng;
  model::ForwardContext ctx;
  ctx.collect_stats = false;
  const Tensor logits = m->forward(tensor(seq, {1, 40}), Tensor(), ctx, true).logits;
  const auto [best, idx] = topk(logits, 1);
  const std::vector<int64_t> top = idx.to_vector<int64_t>();
  for (std::size_t i = 0; i < out.size(); ++i)
    EXPECT_EQ(out[i], top[prompt.size() - 1 + i]) << "generated token " << i;
}

TEST(Generate, SamplesAreSeededStopStringsCutAndTheContextEnds) {
  const model::ModelSpec spec = byte_model();
  auto m = model::build_model(spec, 6);
  const data::ByteTokenizer bytes;
  const std::vector<int32_t> prompt = bytes.encode("R ab:7 ?ab:");
  trainer::GenerateOptions o;
  o.max_new_tokens = 12;
  o.samples = 3;
  o.sampling.seed = 11;
  auto a = trainer::generate(*m, {}, Device::cpu(), bytes, prompt, o);
  auto b = trainer::generate(*m, {}, Device::cpu(), bytes, prompt, o);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->tokens, b->tokens) << "the same seed";
  EXPECT_NE(a->tokens[0], a->tokens[1]) << "samples of a batch draw apart";
  // A stop string taken from the first sample's text ends it there.
  const std::string stop = a->text[0].substr(4, 2);
  o.stop = {stop};
  auto s = trainer::generate(*m, {}, Device::cpu(), bytes, prompt, o);
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->ended_by[0], "stop");
  EXPECT_EQ(s->text[0], a->text[0].substr(0, a->text[0].find(stop)));
  std::string streamed;
  auto st = trainer::generate(*m, {}, Device::cpu(), bytes, prompt, o,
                              [&](const std::string& piece) { streamed += piece; });
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(streamed, s->text[0]) << "the stream holds back a possible stop string";
  // model.max_seq_len 64: a 60-token prompt gets 5 tokens (the last predicted from position 63).
  o.stop.clear();
  o.samples = 1;
  o.max_new_tokens = 50;
  auto c = trainer::generate(*m, {}, Device::cpu(), bytes, std::vector<int32_t>(60, 65), o);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->ended_by[0], "context");
  EXPECT_EQ(c->tokens[0].size(), 5u);
}

TEST(Generate, BadRequestsAreRefusedWithTheReason) {
  auto m = model::build_model(byte_model(), 5);
  const data::ByteTokenizer bytes;
  trainer::GenerateOptions o;
  auto msg = [&](const std::vector<int32_t>& prompt) {
    auto g = trainer::generate(*m, {}, Device::cpu(), bytes, prompt, o);
    return g.ok() ? std::string("accepted") : g.status().message();
  };
  EXPECT_NE(msg({}).find("the prompt is empty"), std::string::npos);
  EXPECT_NE(
      msg(std::vector<int32_t>(65, 66)).find("longer than the model's model.max_seq_len = 64"),
      std::string::npos);
  EXPECT_NE(msg({300}).find("outside the model's vocabulary of 256"), std::string::npos);
  o.stop = {""};
  EXPECT_NE(msg({65}).find("--stop"), std::string::npos);
}

}  // namespace
}  // namespace hydra
