// Batches for training and evaluation. A sequence is a pure function of (seed, split, step, index
// in the global batch), so a rank builds exactly its own slice of the global batch, and a loader
// resumes from its step alone. Batches are prepared ahead on a thread.
#pragma once

#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "data/shards.h"
#include "data/synthetic.h"

namespace hydra::data {

struct Batch {
  int64_t step = 0, batch = 0, len = 0;
  std::vector<int64_t> tokens;   // [batch, len]
  std::vector<int64_t> targets;  // [batch, len]: the next token
  // Synthetic data's tags (data/synthetic.h), [batch, len]: answer[t] and level[t] are the task and
  // difficulty level of target (t) if it is an answer, else -1; domain[t] the mixture domain of
  // token (t), else -1.
  std::vector<int8_t> answer, level, domain;
};

enum class Split : uint64_t { kTrain = 0, kEval = 1 };

// Fills one sequence of len + 1 tokens and their tags (all -1 where a source has none).
class DataSource {
 public:
  virtual ~DataSource() = default;
  virtual Status fill(Split split, uint64_t seed, int64_t step, int64_t index, int64_t n,
                      int32_t* tokens, TokenTags tags) const = 0;
  // Largest token id + 1.
  virtual int64_t vocab_size() const = 0;
  virtual std::string describe() const = 0;
};

class SyntheticSource final : public DataSource {
 public:
  explicit SyntheticSource(const config::SyntheticConfig& cfg) : tasks_(cfg) {}
  Status fill(Split split, uint64_t seed, int64_t step, int64_t index, int64_t n, int32_t* tokens,
              TokenTags tags) const override;
  int64_t vocab_size() const override { return SyntheticTasks::kVocab; }
  std::string describe() const override { return "synthetic tasks (built in)"; }

 private:
  SyntheticTasks tasks_;
};

// Windows of token shards: the first (1 - eval_fraction) of each shard trains, the rest evaluates.
class ShardSource final : public DataSource {
 public:
  static Expected<std::shared_ptr<ShardSource>> open(const std::vector<std::string>& paths,
                                                     double eval_fraction, int64_t window);
  Status fill(Split split, uint64_t seed, int64_t step, int64_t index, int64_t n, int32_t* tokens,
              TokenTags tags) const override;
  int64_t vocab_size() const override { return vocab_; }
  std::string describe() const override;
  const std::string& tokenizer() const { return tokenizer_; }

 private:
  std::vector<TokenShard> shards_;
  std::vector<int64_t> train_tokens_;
  int64_t vocab_ = 0;
  double eval_fraction_ = 0;
  std::string tokenizer_;
};

struct LoaderOptions {
  uint64_t seed = 0;
  int64_t global_batch = 1;  // sequences per step over all ranks and micro-batches
  int64_t first = 0;         // this loader's sequences: [first, first + count) of the global batch
  int64_t count = 1;
  int64_t seq_len = 1;
  int64_t prefetch = 2;
  Split split = Split::kTrain;
};

class Loader {
 public:
  Loader(std::shared_ptr<const DataSource> source, LoaderOptions options);
  ~Loader();
  Loader(const Loader&) = delete;
  Loader& operator=(const Loader&) = delete;
  // The batch of `step` (steps are asked in increasing order for prefetching to pay; any order
  // works).
  Expected<Batch> get(int64_t step);
  const LoaderOptions& options() const { return opt_; }

 private:
  Expected<Batch> build(int64_t step) const;
  void worker();

  Expected<Batch> build_caught(int64_t step) const;

  std::shared_ptr<const DataSource> source_;
  LoaderOptions opt_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::pair<int64_t, Expected<Batch>>> ready_;
  int64_t next_step_ = -1;   // what the worker builds next
  int64_t building_ = -1;    // what it is building now
  uint64_t generation_ = 0;  // bumped when get() jumps; older builds are dropped
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace hydra::data
