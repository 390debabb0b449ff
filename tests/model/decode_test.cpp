// Recurrent decoding (LanguageModel::decode) against the full forward: a sequence fed in segments
// of any length, one token at a time included, gives the logits the whole sequence's forward gives
// at the same positions.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "autograd/grad_mode.h"
#include "tests/model/model_util.h"

namespace hydra {
namespace {

using testing::random_tokens;

// Feeds `tokens` [B, len] in segments of the given lengths (cycled) and compares every position's
// logits with the full forward's, in float64: the same sums in another order, so within 1e-9.
void expect_decode_equals_forward(const model::ModelSpec& spec, int64_t batch, int64_t len,
                                  const std::vector<int64_t>& segments,
                                  const model::PathSwitches& paths = {}, int64_t kv_split = 1024) {
  auto m = model::build_model(spec, 21);
  m->to(DType::kF64);
  NoGradGuard ng;
  const Tensor tokens = random_tokens(spec.vocab, batch, len, 22);
  model::ForwardContext ctx;
  ctx.paths = paths;
  ctx.collect_stats = false;
  const std::vector<double> full =
      m->forward(tokens, Tensor(), ctx, true).logits.to_vector<double>();
  model::DecodeState state(batch, spec.max_seq_len);
  state.kv_split = kv_split;
  const int64_t V = spec.vocab;
  int64_t pos = 0;
  for (std::size_t i = 0; pos < len; ++i) {
    const int64_t n = std::min(segments[i % segments.size()], len - pos);
    const bool last_only = i % 3 == 2;  // also the last position alone
    const std::vector<double> got =
        m->decode(tokens.narrow(1, pos, n), paths, state, last_only).to_vector<double>();
    const int64_t first = last_only ? n - 1 : 0, rows = n - first;
    ASSERT_EQ(static_cast<int64_t>(got.size()), batch * rows * V);
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t t = 0; t < rows; ++t)
        for (int64_t v = 0; v < V; ++v)
          ASSERT_NEAR(got[(b * rows + t) * V + v], full[(b * len + pos + first + t) * V + v], 1e-9)
              << "sequence " << b << ", position " << pos + first + t << " (segment " << i << " of "
              << n << " tokens from " << pos << ")";
    pos += n;
    EXPECT_EQ(state.position, pos);
  }
}

const std::vector<int64_t> kSegments = {5, 1, 1, 3, 8, 1, 17, 2, 1, 24, 1, 1, 1};

std::string hydra_text(const std::string& router_input, const std::string& write,
                       const std::string& extra = "") {
  return "vocab_size: 64 d_model: 16 num_blocks: 4 max_seq_len: 96 ssm { d_state: 4 } "
         "sga { every: 2 num_heads: 2 window: 9 global_stride: 8 } "
         "moe { num_experts: 4 d_expert: 16 max_active: 2 chunk: 8 router_input: " +
         router_input +
         " } workspace { slots: 4 chunk: 16 num_heads: 2 attn_dim: 8 after_block: [1, 3] write: " +
         write + " } pkm { num_heads: 2 k_dim: 8 n_keys: 6 topk: 3 } " + extra;
}

TEST(Decode, SegmentsOfAnyLengthEqualTheFullForwardEveryRouterInputAndWrite) {
  for (const auto& [mode, write] :
       std::vector<std::pair<std::string, std::string>>{{"PREV_CHUNK_MEAN", "SERIAL"},
                                                        {"FIRST_TOKEN", "SERIAL"},
                                                        {"PREV_CHUNK_MEAN", "PARALLEL"}}) {
    SCOPED_TRACE(mode + ", " + write);
    expect_decode_equals_forward(testing::spec_from(hydra_text(mode, write)), 2, 96, kSegments);
  }
}

TEST(Decode, OneTokenAtATimeFromTheStart) {
  expect_decode_equals_forward(testing::spec_from(hydra_text("PREV_CHUNK_MEAN", "SERIAL")), 1, 48,
                               {1});
}

TEST(Decode, SharedExpertEverySsmFormWithAndWithoutTheController) {
  // The micro model (shared expert, a workspace after each block), its SSM in the SSD form and in
  // the paper's form (one state per channel, no convolution); the controller on (the default) and
  // off.
  for (const std::string& ssm :
       {std::string(""), std::string(testing::kMicroSsd), std::string(testing::kMicroPaperSsm)})
    for (const char* block : {"", " block { controller: false }"}) {
      SCOPED_TRACE(ssm + block);
      const std::string text = ssm.empty() ? testing::kMicroModel : testing::micro_text(ssm);
      expect_decode_equals_forward(testing::spec_from(text + block), 2, 32, {3, 1, 6, 1, 1, 9});
    }
}

TEST(Decode, TheCurriculumsPathSwitches) {
  // Stage by stage, as hydra-generate runs a checkpoint: only the paths its stage switched on.
  const model::ModelSpec spec = testing::spec_from(hydra_text("PREV_CHUNK_MEAN", "SERIAL"));
  model::PathSwitches backbone{
      .sga = false, .moe_routing = false, .workspace = false, .pkm = false};
  model::PathSwitches experts{.workspace = false, .pkm = false};
  model::PathSwitches no_ssm{.ssm = false};
  for (const model::PathSwitches& p : {backbone, experts, no_ssm})
    expect_decode_equals_forward(spec, 2, 64, {7, 1, 9, 1, 1, 30}, p);
}

TEST(Decode, TransformerSegmentsEqualTheFullForward) {
  const model::ModelSpec spec = testing::spec_from(
      "kind: TRANSFORMER vocab_size: 50 d_model: 16 num_blocks: 2 max_seq_len: 64");
  expect_decode_equals_forward(spec, 2, 64, kSegments);
  // One token's attention over the cache in parts of 8 and 5 keys, merged.
  for (const int64_t split : {8, 5}) expect_decode_equals_forward(spec, 2, 64, {20, 1}, {}, split);
}

TEST(Decode, TheTinyConfig) {
  const model::ModelSpec spec = testing::shipped_spec("tiny");
  expect_decode_equals_forward(spec, 1, 256, {100, 1, 1, 1, 7, 1, 33, 1});
}

}  // namespace
}  // namespace hydra
