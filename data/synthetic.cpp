#include "data/synthetic.h"

#include <algorithm>
#include <numeric>
#include <set>

#include "kernels/base/check.h"

namespace hydra::data {

const char* task_name(int task) {
  static const char* names[kNumTasks] = {"chaining", "recall", "mixture", "factual", "copying"};
  return task >= 0 && task < kNumTasks ? names[task] : "?";
}

namespace {

char letter(Rng& rng) { return static_cast<char>('a' + rng.below(26)); }

// `count` distinct lowercase letters.
std::string distinct_letters(Rng& rng, int64_t count) {
  std::string alphabet = "abcdefghijklmnopqrstuvwxyz";
  for (int64_t i = 25; i > 0; --i) std::swap(alphabet[i], alphabet[rng.below(i + 1)]);
  return alphabet.substr(0, static_cast<std::size_t>(std::min<int64_t>(count, 26)));
}

}  // namespace

SyntheticTasks::SyntheticTasks(const config::SyntheticConfig& cfg) : cfg_(cfg) {
  const double w[kNumTasks] = {cfg.chaining_weight(), cfg.recall_weight(), cfg.mixture_weight(),
                               cfg.factual_weight(), cfg.copying_weight()};
  double total = 0;
  for (double v : w) total += std::max(0.0, v);
  HYDRA_CHECK(total > 0) << "synthetic data: every task weight is zero";
  double acc = 0;
  for (double v : w) {
    acc += std::max(0.0, v) / total;
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

void SyntheticTasks::chaining(Rng& rng, Text& t) const {
  const int64_t facts = std::max<int64_t>(1, std::min<int64_t>(cfg_.chain_facts(), 25));
  const int64_t hops = std::clamp<int64_t>(cfg_.chain_hops(), 1, std::min<int64_t>(facts, 9));
  const std::string ent = distinct_letters(rng, facts + 1);
  std::vector<int64_t> order(facts);
  std::iota(order.begin(), order.end(), 0);
  for (int64_t i = facts - 1; i > 0; --i) std::swap(order[i], order[rng.below(i + 1)]);
  std::string body = "H ";
  for (int64_t k = 0; k < facts; ++k) {
    const int64_t i = order[k];
    body += std::string{ent[i], '>', ent[i + 1]} + (k + 1 < facts ? "," : "");
  }
  const int64_t start = rng.below(facts - hops + 1);
  body += " ?" + std::string{ent[start]} + std::to_string(hops) + "=";
  t.add(body);
  t.add(std::string{ent[start + hops]}, static_cast<int8_t>(Task::kChaining));
  t.add("\n");
}

void SyntheticTasks::recall(Rng& rng, Text& t) const {
  const int64_t pairs = std::max<int64_t>(1, cfg_.recall_pairs());
  std::set<std::string> used;
  std::vector<std::pair<std::string, char>> kv;
  while (static_cast<int64_t>(kv.size()) < pairs) {
    std::string k{letter(rng), letter(rng)};
    if (used.insert(k).second) kv.push_back({k, static_cast<char>('0' + rng.below(10))});
  }
  std::string body = "R ";
  for (const auto& [k, v] : kv) body += k + ":" + v + " ";
  body += std::string(static_cast<std::size_t>(rng.below(48)),
                      '.');  // distance between pairs and query
  const auto& q = kv[rng.below(pairs)];
  body += "?" + q.first + ":";
  t.add(body);
  t.add(std::string{q.second}, static_cast<int8_t>(Task::kRecall));
  t.add("\n");
}

void SyntheticTasks::mixture(Rng& rng, Text& t) const {
  const int8_t task = static_cast<int8_t>(Task::kMixture);
  const int8_t dom = static_cast<int8_t>(rng.below(3));
  if (dom == 0) {  // arithmetic progression; the last term follows from the first two
    const int64_t a = rng.below(20), s = 1 + rng.below(9);
    std::string body = "M0 ";
    for (int k = 0; k < 5; ++k) body += std::to_string(a + k * s) + ",";
    t.add(body, -1, dom);
    t.add(std::to_string(a + 5 * s), task, dom);
    t.add("\n", -1, dom);
  } else if (dom == 1) {  // a pattern repeated; its last repetition is predictable
    std::string p;
    for (int64_t k = 0, n = 3 + rng.below(3); k < n; ++k) p.push_back(letter(rng));
    t.add("M1 " + p + p + p, -1, dom);
    t.add(p, task, dom);
    t.add("\n", -1, dom);
  } else {  // a fixed Markov chain over letters
    std::string body = "M2 ";
    char c = letter(rng);
    for (int k = 0; k < 20; ++k) {
      body.push_back(c);
      c = markov_[c - 'a'][rng.below(2)];
    }
    t.add(body + "\n", -1, dom);
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
  for (int64_t k = 0, n = std::max<int64_t>(1, cfg_.copy_len()); k < n; ++k)
    s.push_back(letter(rng));
  t.add("C " + s + "|");
  t.add(s, static_cast<int8_t>(Task::kCopying));
  t.add("\n");
}

void SyntheticTasks::fill(Rng& rng, int64_t n, int32_t* tokens, int8_t* answer,
                          int8_t* domain) const {
  Text t;
  while (static_cast<int64_t>(t.s.size()) < n) {
    const double u = rng.unit();
    const int task = static_cast<int>(std::lower_bound(cumulative_.begin(), cumulative_.end(), u) -
                                      cumulative_.begin());
    switch (static_cast<Task>(std::min(task, kNumTasks - 1))) {
      case Task::kChaining:
        chaining(rng, t);
        break;
      case Task::kRecall:
        recall(rng, t);
        break;
      case Task::kMixture:
        mixture(rng, t);
        break;
      case Task::kFactual:
        factual(rng, t);
        break;
      case Task::kCopying:
        copying(rng, t);
        break;
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    tokens[i] = static_cast<unsigned char>(t.s[i]);
    answer[i] = t.answer[i];
    domain[i] = t.domain[i];
  }
}

}  // namespace hydra::data
