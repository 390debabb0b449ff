#include "trainer/generation.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>

#include "autograd/grad_mode.h"
#include "autograd/profiler.h"

namespace hydra::trainer {

Status check_sampling(const SamplingOptions& o) {
  if (!std::isfinite(o.temperature) || o.temperature < 0)
    return invalid_argument("--temperature must be >= 0 (0: greedy), got " +
                            std::to_string(o.temperature));
  if (o.top_k < 0) return invalid_argument("--top-k must be >= 0 (0: every token)");
  if (!std::isfinite(o.top_p) || o.top_p <= 0 || o.top_p > 1)
    return invalid_argument("--top-p must be in (0, 1], got " + std::to_string(o.top_p));
  return Status();
}

int32_t sample_token(const std::vector<float>& logits, const SamplingOptions& o, data::Rng& rng) {
  const int64_t V = static_cast<int64_t>(logits.size());
  // Most likely first, the lower id on ties.
  std::vector<int32_t> order(V);
  std::iota(order.begin(), order.end(), 0);
  const auto likelier = [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  };
  if (o.temperature == 0) return *std::min_element(order.begin(), order.end(), likelier);
  const int64_t k = o.top_k > 0 ? std::min(o.top_k, V) : V;
  std::partial_sort(order.begin(), order.begin() + k, order.end(), likelier);
  order.resize(k);
  std::vector<double> p(k);
  const double top = logits[order[0]];
  double total = 0;
  for (int64_t i = 0; i < k; ++i)
    total += p[i] = std::exp((logits[order[i]] - top) / o.temperature);
  int64_t keep = k;
  if (o.top_p < 1) {
    double mass = 0;
    for (keep = 0; keep < k;) {
      mass += p[keep++] / total;
      if (mass >= o.top_p) break;
    }
  }
  const double kept = std::accumulate(p.begin(), p.begin() + keep, 0.0);
  double u = rng.unit() * kept;
  for (int64_t i = 0; i < keep; ++i) {
    if (u < p[i]) return order[i];
    u -= p[i];
  }
  return order[keep - 1];  // rounding left u just past the end
}

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// The first sample's text as it is decided: what is sure not to become part of a stop string.
class TextStream {
 public:
  TextStream(const std::function<void(const std::string&)>& sink,
             const std::vector<std::string>& stop)
      : sink_(sink) {
    for (const std::string& s : stop) hold_ = std::max(hold_, s.size() - 1);
  }
  // text: the sample's whole new text so far; final: nothing more will come.
  void update(const std::string& text, bool final) {
    if (!sink_) return;
    const std::size_t sure = final ? text.size() : text.size() - std::min(hold_, text.size());
    if (sure > sent_) sink_(text.substr(sent_, sure - sent_));
    sent_ = std::max(sent_, sure);
  }

 private:
  const std::function<void(const std::string&)>& sink_;
  std::size_t hold_ = 0, sent_ = 0;
};

}  // namespace

Expected<Generation> generate(model::LanguageModel& model, const model::PathSwitches& paths,
                              Device device, const data::Tokenizer& tokenizer,
                              const std::vector<int32_t>& prompt, const GenerateOptions& options,
                              const std::function<void(const std::string&)>& on_text) {
  HYDRA_RETURN_IF_ERROR(check_sampling(options.sampling));
  const model::ModelSpec& spec = model.spec();
  if (prompt.empty())
    return invalid_argument("the prompt is empty: generation continues at least one token");
  if (static_cast<int64_t>(prompt.size()) > spec.max_seq_len)
    return out_of_range(
        "the prompt is " + std::to_string(prompt.size()) +
        " tokens, longer than the model's model.max_seq_len = " + std::to_string(spec.max_seq_len) +
        ": shorten it (or raise max_seq_len with --set, if the model was trained "
        "for it)");
  for (int32_t t : prompt)
    if (t < 0 || t >= spec.vocab)
      return invalid_argument(
          "prompt token " + std::to_string(t) + " is outside the model's vocabulary of " +
          std::to_string(spec.vocab) + " (is data.tokenizer the model's tokenizer?)");
  if (options.max_new_tokens < 1) return invalid_argument("--max-new-tokens must be >= 1");
  if (options.samples < 1) return invalid_argument("--samples must be >= 1");
  for (const std::string& s : options.stop)
    if (s.empty()) return invalid_argument("--stop: a stop string cannot be empty");

  NoGradGuard no_grad;
  const int64_t B = options.samples, P = static_cast<int64_t>(prompt.size());
  const int64_t capacity = std::min(spec.max_seq_len, P + options.max_new_tokens);
  model::DecodeState state(B, capacity);
  Generation g;
  g.prompt_tokens = P;
  g.tokens.resize(B);
  g.text.resize(B);
  g.ended_by.assign(B, "");
  std::vector<data::Rng> rngs;
  for (int64_t b = 0; b < B; ++b) rngs.push_back(data::Rng({options.sampling.seed, uint64_t(b)}));
  TextStream stream(on_text, options.stop);

  std::vector<int64_t> feed;
  for (int64_t b = 0; b < B; ++b) feed.insert(feed.end(), prompt.begin(), prompt.end());
  int64_t len = P, live = B;
  auto t0 = std::chrono::steady_clock::now();
  while (live > 0) {
    const Tensor logits =
        model.decode(tensor(feed, {B, len}).to(device), paths, state, /*last_only=*/true);
    const std::vector<float> host = logits.to(DType::kF32).to_vector<float>();  // [B, V]
    if (state.position == P) {
      g.prefill_s = seconds_since(t0);
      if (kernel_profile_enabled()) kernel_profile_reset();  // the profile covers the steps
      t0 = std::chrono::steady_clock::now();
    } else {
      ++g.decode_steps;
    }
    feed.assign(B, 0);
    for (int64_t b = 0; b < B; ++b) {
      if (!g.ended_by[b].empty()) continue;  // finished: its row is decoded but not read
      const std::vector<float> row(host.begin() + b * spec.vocab,
                                   host.begin() + (b + 1) * spec.vocab);
      const int32_t next = sample_token(row, options.sampling, rngs[b]);
      feed[b] = next;
      g.tokens[b].push_back(next);
      g.text[b] = tokenizer.decode(g.tokens[b]);
      std::size_t cut = std::string::npos;
      for (const std::string& s : options.stop) cut = std::min(cut, g.text[b].find(s));
      if (cut != std::string::npos) {
        g.text[b].resize(cut);
        g.ended_by[b] = "stop";
      } else if (static_cast<int64_t>(g.tokens[b].size()) == options.max_new_tokens) {
        g.ended_by[b] = "length";
      } else if (state.position == capacity) {
        g.ended_by[b] = "context";
      }
      live -= !g.ended_by[b].empty();
      if (b == 0) stream.update(g.text[0], !g.ended_by[0].empty());
    }
    len = 1;
  }
  if (g.decode_steps > 0) g.decode_s = seconds_since(t0);
  return g;
}

}  // namespace hydra::trainer
