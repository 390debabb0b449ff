// The synthetic tasks of hydra.md section 9, the built-in default data. Sequences are byte tokens
// (ASCII) with episodes packed back to back, each tagged by a letter:
//   H chaining  "H c>k,x>w,a>c,k>q,w>e ?a=q": k implications (proof length k, mixed 2..5) hidden
//               among distractor implications between other letters, shuffled; the query names
//               the chain's start, the answer is its end (the letter reached after k hops)
//   R recall    "R ab:7 cd:2 ... ?cd:2": key-value pairs, then up to 47 dots, then a query (near);
//               or "S ab:7 cd:2 ...", other episodes for recall_gap tokens, "T ?cd:2" (far: the
//               query sits further back than an attention window reaches)
//   M mixture   three generators: arithmetic progressions, repeated patterns, a fixed Markov chain
//               (answers: the last term / the last repetition; each token tagged with its domain)
//   F factual   "F QZK=mo" from a fixed table of subjects and attributes (answer: the attribute)
//   C copying   "C xkcdq|xkcdq" (answer: the copy)
//   P distant   "P <chaining premises>", other episodes for up to distant_gap tokens, then
//               "Q ?a=q": chaining whose premises sit far before the query (the workspace's task)
// A far query's gap is filled with whole episodes of the near tasks, and a line of dots for the
// last stretch shorter than an episode. A far episode that would not fit in the sequence is
// replaced by its near form (recall) or by plain chaining (distant). The world (fact table, Markov
// chain) comes from SyntheticConfig.seed; each sequence from an Rng the loader seeds with (seed,
// split, step, index).
#pragma once

#include <array>
#include <string>
#include <vector>

#include "base/status.h"
#include "configs/hydra.pb.h"
#include "data/rng.h"

namespace hydra::data {

enum class Task : int8_t {
  kChaining = 0,
  kRecall = 1,
  kMixture = 2,
  kFactual = 3,
  kCopying = 4,
  kDistant = 5
};
inline constexpr int kNumTasks = 6;
const char* task_name(int task);

// Difficulty levels within a task, reported beside its accuracy: chaining and distant, the proof
// length k ("k2" .. "k9"); recall, "near" or "far"; mixture, the domain ("arith", "pattern").
// Factual and copying have none.
inline constexpr int kNumLevels = 10;
// The level's name ("" where the task has no such level).
std::string level_name(int task, int level);

// What each token is, for evaluation (arrays of the sequence's length): answer, the task whose
// answer the token is (else -1); level, that answer's difficulty level (else -1); domain, the
// mixture domain (0..2) that generated the token (else -1).
struct TokenTags {
  int8_t* answer;
  int8_t* level;
  int8_t* domain;
};

// Checks a task mix: weights finite and >= 0 with one > 0, sizes in range. Fields are named
// `prefix` + field (e.g. "data.synthetic.chain_max_hops").
Status validate_synthetic(const config::SyntheticConfig& cfg, const std::string& prefix);

class SyntheticTasks {
 public:
  explicit SyntheticTasks(const config::SyntheticConfig& cfg);
  // Fills n tokens and their tags.
  void fill(Rng& rng, int64_t n, int32_t* tokens, TokenTags tags) const;
  // All tokens are bytes below this.
  static constexpr int64_t kVocab = 128;
  const config::SyntheticConfig& config() const { return cfg_; }

 private:
  struct Text {
    std::string s;
    std::vector<int8_t> answer, level, domain;
    void add(const std::string& part, int8_t ans = -1, int8_t lvl = -1, int8_t dom = -1) {
      s += part;
      answer.insert(answer.end(), part.size(), ans);
      level.insert(level.end(), part.size(), lvl);
      domain.insert(domain.end(), part.size(), dom);
    }
    int64_t size() const { return static_cast<int64_t>(s.size()); }
  };
  // k implications over k + 1 distinct letters among distractor implications, shuffled.
  struct Chain {
    std::string premises;
    char start, end;
    int hops;
  };
  Chain chain(Rng& rng) const;
  void chaining(Rng& rng, Text& t) const;
  void recall(Rng& rng, Text& t, int64_t n) const;
  void mixture(Rng& rng, Text& t) const;
  void factual(Rng& rng, Text& t) const;
  void copying(Rng& rng, Text& t) const;
  void distant(Rng& rng, Text& t, int64_t n) const;
  // One episode of a task drawn by weight; far forms only when `nested` is false.
  void episode(Rng& rng, Text& t, int64_t n, bool nested) const;
  // Whole episodes of the near tasks, then a line of dots, until t holds `until` tokens.
  void gap(Rng& rng, Text& t, int64_t until) const;

  config::SyntheticConfig cfg_;
  std::vector<double> cumulative_;  // task weights, cumulative and normalised
  std::vector<std::pair<std::string, std::string>> facts_;
  std::vector<std::array<char, 2>> markov_;  // successors of each letter
};

}  // namespace hydra::data
