#include "data/synthetic.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <set>
#include <sstream>

#include "base/check.h"

namespace hydra::data {

const char* task_name(int task) {
  static const char* names[kNumTasks] = {"chaining", "recall",  "mixture",
                                         "factual",  "copying", "distant"};
  return task >= 0 && task < kNumTasks ? names[task] : "?";
}

std::string level_name(int task, int level) {
  if (level < 0 || level >= kNumLevels) return "";
  switch (static_cast<Task>(task)) {
    case Task::kChaining:
    case Task::kDistant:
      return level >= 1 ? std::string{'k', static_cast<char>('0' + level)} : "";  // level <= 9
    case Task::kRecall:
      return level == 0 ? "near" : level == 1 ? "far" : "";
    case Task::kMixture:
      return level == 0 ? "arith" : level == 1 ? "pattern" : "";
    default:
      return "";
  }
}

Status validate_synthetic(const config::SyntheticConfig& cfg, const std::string& prefix) {
  auto fail = [&](const char* field, const auto& value, const std::string& requirement) {
    std::ostringstream os;
    os << prefix << field << " = " << value << " " << requirement;
    return invalid_argument(os.str());
  };
  const std::pair<const char*, double> weights[kNumTasks] = {
      {"chaining_weight", cfg.chaining_weight()}, {"recall_weight", cfg.recall_weight()},
      {"mixture_weight", cfg.mixture_weight()},   {"factual_weight", cfg.factual_weight()},
      {"copying_weight", cfg.copying_weight()},   {"distant_weight", cfg.distant_weight()}};
  double total = 0;
  for (const auto& [field, w] : weights) {
    if (!std::isfinite(w) || w < 0) return fail(field, w, "must be a finite number >= 0");
    total += w;
  }
  if (total <= 0)
    return fail("*_weight", 0, "(all six task weights) must not all be 0: no task would be drawn");
  if (cfg.chain_min_hops() < 1 || cfg.chain_min_hops() > 9)
    return fail("chain_min_hops", cfg.chain_min_hops(), "must be in [1, 9]");
  if (cfg.chain_max_hops() < cfg.chain_min_hops() || cfg.chain_max_hops() > 9)
    return fail("chain_max_hops", cfg.chain_max_hops(),
                "must be in [chain_min_hops (" + std::to_string(cfg.chain_min_hops()) + "), 9]");
  const int64_t others = 25 - cfg.chain_max_hops();  // letters outside the longest chain
  if (cfg.chain_distractors() < 0 || cfg.chain_distractors() > others)
    return fail("chain_distractors", cfg.chain_distractors(),
                "must be in [0, " + std::to_string(others) +
                    "] (distractors start at distinct letters outside the chain)");
  if (cfg.recall_pairs() < 1 || cfg.recall_pairs() > 100)
    return fail("recall_pairs", cfg.recall_pairs(), "must be in [1, 100]");
  if (!(cfg.recall_far_fraction() >= 0 && cfg.recall_far_fraction() <= 1))
    return fail("recall_far_fraction", cfg.recall_far_fraction(), "must be in [0, 1]");
  if (cfg.recall_gap() < 1) return fail("recall_gap", cfg.recall_gap(), "must be >= 1");
  if (cfg.distant_gap() < 2) return fail("distant_gap", cfg.distant_gap(), "must be >= 2");
  if (cfg.fact_table_size() < 1 || cfg.fact_table_size() > 10000)
    return fail("fact_table_size", cfg.fact_table_size(), "must be in [1, 10000]");
  if (cfg.copy_len() < 1 || cfg.copy_len() > 1000)
    return fail("copy_len", cfg.copy_len(), "must be in [1, 1000]");
  return ok_status();
}

namespace {

char letter(Rng& rng) { return static_cast<char>('a' + rng.below(26)); }

// The 26 lowercase letters in random order.
std::string shuffled_letters(Rng& rng) {
  std::string alphabet = "abcdefghijklmnopqrstuvwxyz";
  for (int64_t i = 25; i > 0; --i) std::swap(alphabet[i], alphabet[rng.below(i + 1)]);
  return alphabet;
}

template <class T>
void shuffle(Rng& rng, std::vector<T>& v) {
  for (int64_t i = static_cast<int64_t>(v.size()) - 1; i > 0; --i)
    std::swap(v[i], v[rng.below(i + 1)]);
}

}  // namespace

SyntheticTasks::SyntheticTasks(const config::SyntheticConfig& cfg) : cfg_(cfg) {
  const Status valid = validate_synthetic(cfg, "synthetic.");
  HYDRA_CHECK(valid.ok()) << valid.message();  // configs are validated before this (curriculum)
  const double w[kNumTasks] = {cfg.chaining_weight(), cfg.recall_weight(),  cfg.mixture_weight(),
                               cfg.factual_weight(),  cfg.copying_weight(), cfg.distant_weight()};
  double total = 0;
  for (double v : w) total += v;
  double acc = 0;
  for (double v : w) {
    acc += v / total;
    cumulative_.push_back(acc);
  }
  Rng world({cfg.seed(), 0x77});
  std::set<std::string> subjects;
  while (static_cast<int64_t>(subjects.size()) < cfg.fact_table_size()) {
    std::string s;
    for (int i = 0; i < 3; ++i) s.push_back(static_cast<char>('A' + world.below(26)));
    subjects.insert(s);
  }
  for (const std::string& s : subjects)
    facts_.push_back({s, std::string{letter(world), letter(world)}});
  for (int i = 0; i < 26; ++i) markov_.push_back({letter(world), letter(world)});
}

// The chain X0 > X1 > ... > Xk over the first k + 1 letters of a shuffled alphabet; each
// distractor starts at a distinct letter outside the chain and ends at another such letter (so
// the walk from X0 is unique and ends at Xk, which starts no implication). Premises in random
// order: the answer's position tells nothing.
SyntheticTasks::Chain SyntheticTasks::chain(Rng& rng) const {
  const int64_t k =
      cfg_.chain_min_hops() + rng.below(cfg_.chain_max_hops() - cfg_.chain_min_hops() + 1);
  const std::string ent = shuffled_letters(rng);
  std::vector<std::string> premises;
  for (int64_t i = 0; i < k; ++i) premises.push_back(std::string{ent[i], '>', ent[i + 1]});
  const int64_t others = 26 - (k + 1);  // ent[k + 1 ..]
  std::string sources = ent.substr(static_cast<std::size_t>(k + 1));
  for (int64_t i = 0; i < cfg_.chain_distractors(); ++i) {
    const char from = sources[i];  // distinct (ent is a permutation)
    char to = from;
    while (to == from) to = ent[k + 1 + rng.below(others)];
    premises.push_back(std::string{from, '>', to});
  }
  shuffle(rng, premises);
  Chain c;
  for (std::size_t i = 0; i < premises.size(); ++i) c.premises += (i ? "," : "") + premises[i];
  c.start = ent[0];
  c.end = ent[k];
  c.hops = static_cast<int>(k);
  return c;
}

void SyntheticTasks::chaining(Rng& rng, Text& t) const {
  const Chain c = chain(rng);
  t.add("H " + c.premises + " ?" + c.start + "=");
  t.add(std::string{c.end}, static_cast<int8_t>(Task::kChaining), static_cast<int8_t>(c.hops));
  t.add("\n");
}

void SyntheticTasks::recall(Rng& rng, Text& t, int64_t n) const {
  const int64_t pairs = cfg_.recall_pairs();
  std::set<std::string> used;
  std::vector<std::pair<std::string, char>> kv;
  while (static_cast<int64_t>(kv.size()) < pairs) {
    std::string k{letter(rng), letter(rng)};
    if (used.insert(k).second) kv.push_back({k, static_cast<char>('0' + rng.below(10))});
  }
  std::string body;
  for (const auto& [k, v] : kv) body += k + ":" + v + " ";
  const auto& q = kv[rng.below(pairs)];
  const std::string query = "?" + q.first + ":";
  // Far: the pairs, then recall_gap tokens of other episodes, then the query (if it fits).
  const bool far = rng.unit() < cfg_.recall_far_fraction();
  const int64_t pairs_end = t.size() + 2 + static_cast<int64_t>(body.size()) + 1;
  if (far && pairs_end + cfg_.recall_gap() + 2 + static_cast<int64_t>(query.size()) + 2 <= n) {
    t.add("S " + body + "\n");
    gap(rng, t, pairs_end + cfg_.recall_gap());
    t.add("T " + query);
    t.add(std::string{q.second}, static_cast<int8_t>(Task::kRecall), 1);
    t.add("\n");
    return;
  }
  body += std::string(static_cast<std::size_t>(rng.below(48)), '.');
  t.add("R " + body + query);
  t.add(std::string{q.second}, static_cast<int8_t>(Task::kRecall), 0);
  t.add("\n");
}

void SyntheticTasks::distant(Rng& rng, Text& t, int64_t n) const {
  const Chain c = chain(rng);
  const std::string premises = "P " + c.premises + "\n", query = "Q ?" + std::string{c.start} + "=";
  // The gap: uniform in [distant_gap / 2, distant_gap], shortened to what the sequence holds; no
  // room for half of it: plain chaining instead.
  const int64_t most = cfg_.distant_gap(), least = most / 2;
  const int64_t room = n - (t.size() + static_cast<int64_t>(premises.size() + query.size()) + 2);
  if (room < least) return chaining(rng, t);
  const int64_t g = std::min(room, least + rng.below(most - least + 1));
  t.add(premises);
  gap(rng, t, t.size() + g);
  t.add(query);
  t.add(std::string{c.end}, static_cast<int8_t>(Task::kDistant), static_cast<int8_t>(c.hops));
  t.add("\n");
}

void SyntheticTasks::mixture(Rng& rng, Text& t) const {
  const int8_t task = static_cast<int8_t>(Task::kMixture);
  const int8_t dom = static_cast<int8_t>(rng.below(3));
  if (dom == 0) {  // arithmetic progression; the last term follows from the first two
    const int64_t a = rng.below(20), s = 1 + rng.below(9);
    std::string body = "M0 ";
    for (int k = 0; k < 5; ++k) body += std::to_string(a + k * s) + ",";
    t.add(body, -1, -1, dom);
    t.add(std::to_string(a + 5 * s), task, 0, dom);
    t.add("\n", -1, -1, dom);
  } else if (dom == 1) {  // a pattern repeated; its last repetition is predictable
    std::string p;
    for (int64_t k = 0, n = 3 + rng.below(3); k < n; ++k) p.push_back(letter(rng));
    t.add("M1 " + p + p + p, -1, -1, dom);
    t.add(p, task, 1, dom);
    t.add("\n", -1, -1, dom);
  } else {  // a fixed Markov chain over letters
    std::string body = "M2 ";
    char c = letter(rng);
    for (int k = 0; k < 20; ++k) {
      body.push_back(c);
      c = markov_[c - 'a'][rng.below(2)];
    }
    t.add(body + "\n", -1, -1, dom);
  }
}

void SyntheticTasks::factual(Rng& rng, Text& t) const {
  const auto& [subject, attribute] = facts_[rng.below(static_cast<int64_t>(facts_.size()))];
  t.add("F " + subject + "=");
  t.add(attribute, static_cast<int8_t>(Task::kFactual));
  t.add("\n");
}

void SyntheticTasks::copying(Rng& rng, Text& t) const {
  std::string s;
  for (int64_t k = 0; k < cfg_.copy_len(); ++k) s.push_back(letter(rng));
  t.add("C " + s + "|");
  t.add(s, static_cast<int8_t>(Task::kCopying));
  t.add("\n");
}

void SyntheticTasks::episode(Rng& rng, Text& t, int64_t n, bool nested) const {
  const double u = rng.unit();
  const int task = static_cast<int>(std::lower_bound(cumulative_.begin(), cumulative_.end(), u) -
                                    cumulative_.begin());
  switch (static_cast<Task>(std::min(task, kNumTasks - 1))) {
    case Task::kChaining:
      return chaining(rng, t);
    case Task::kRecall:
      return recall(rng, t, nested ? 0 : n);  // n 0: never far
    case Task::kMixture:
      return mixture(rng, t);
    case Task::kFactual:
      return factual(rng, t);
    case Task::kCopying:
      return copying(rng, t);
    case Task::kDistant:
      return nested ? chaining(rng, t) : distant(rng, t, n);
  }
}

void SyntheticTasks::gap(Rng& rng, Text& t, int64_t until) const {
  while (true) {
    Text e;
    episode(rng, e, 0, true);
    if (t.size() + e.size() > until) break;
    t.s += e.s;
    t.answer.insert(t.answer.end(), e.answer.begin(), e.answer.end());
    t.level.insert(t.level.end(), e.level.begin(), e.level.end());
    t.domain.insert(t.domain.end(), e.domain.begin(), e.domain.end());
  }
  // Dots to the end of the gap, on a line of their own: the query starts a line.
  if (t.size() < until)
    t.add(std::string(static_cast<std::size_t>(until - t.size() - 1), '.') + "\n");
}

void SyntheticTasks::fill(Rng& rng, int64_t n, int32_t* tokens, TokenTags tags) const {
  Text t;
  while (t.size() < n) episode(rng, t, n, false);
  for (int64_t i = 0; i < n; ++i) {
    tokens[i] = static_cast<unsigned char>(t.s[i]);
    tags.answer[i] = t.answer[i];
    tags.level[i] = t.level[i];
    tags.domain[i] = t.domain[i];
  }
}

}  // namespace hydra::data
