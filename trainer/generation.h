// Text generation by recurrent decoding (model::LanguageModel::decode): the prompt is fed once,
// then each sampled token alone. A step's cost does not grow with the context: the SSM and the
// memories carry fixed-size states and the attention reads its window and the global tokens'
// keys (hydra.md section 3: W + t / stride keys for a query at t, all t keys every stride-th step).
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "base/status.h"
#include "data/rng.h"
#include "data/tokenizer.h"
#include "model/lm.h"

namespace hydra::trainer {

struct SamplingOptions {
  double temperature = 1.0;  // 0: greedy (the most likely token, the lowest id on ties)
  int64_t top_k = 0;         // keep the k most likely tokens (0: all)
  double top_p = 1.0;        // keep the fewest most likely tokens whose probability reaches top_p
  uint64_t seed = 0;
};

// An error naming the option (--temperature, --top-k, --top-p) when a value is out of range.
Status check_sampling(const SamplingOptions& o);

// Draws a token from one row of logits: softmax(logits / temperature) restricted to the top-k and
// then the top-p tokens, renormalised. Deterministic given the generator's state.
int32_t sample_token(const std::vector<float>& logits, const SamplingOptions& o, data::Rng& rng);

struct GenerateOptions {
  int64_t max_new_tokens = 128;
  int64_t samples = 1;  // continuations of the prompt, decoded together as one batch
  // A sample ends where its text first contains one of these; the text stops before it.
  std::vector<std::string> stop;
  SamplingOptions sampling;
};

struct Generation {
  std::vector<std::vector<int32_t>> tokens;  // per sample: its new tokens
  std::vector<std::string> text;             // their text, cut before a stop string
  std::vector<std::string> ended_by;         // "stop", "length" (max_new_tokens) or "context"
  int64_t prompt_tokens = 0;
  double prefill_s = 0;      // the prompt's forward, until its last logits are on the host
  double decode_s = 0;       // the steps after it
  int64_t decode_steps = 0;  // tokens fed one at a time
};

// Generates from `prompt` (token ids) with the paths `paths` switches on, on the model's device.
// Errors name what to change: an empty prompt, one longer than model.max_seq_len, ids outside the
// vocabulary. on_text (optional) receives the first sample's new text as it is decided (held back
// while it could still turn into a stop string).
Expected<Generation> generate(model::LanguageModel& model, const model::PathSwitches& paths,
                              Device device, const data::Tokenizer& tokenizer,
                              const std::vector<int32_t>& prompt, const GenerateOptions& options,
                              const std::function<void(const std::string&)>& on_text = nullptr);

}  // namespace hydra::trainer
