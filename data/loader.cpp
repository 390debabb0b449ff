#include "data/loader.h"

#include <unistd.h>

#include <algorithm>
#include <exception>
#include <new>
#include <sstream>
#include <string>

namespace hydra::data {

namespace {

// The machine's physical memory in bytes (0: unknown).
double physical_memory_bytes() {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  return pages > 0 && page > 0 ? double(pages) * double(page) : 0.0;
}

}  // namespace

Status SyntheticSource::fill(Split split, uint64_t seed, int64_t step, int64_t index, int64_t n,
                             int32_t* tokens, TokenTags tags) const {
  Rng rng({seed, static_cast<uint64_t>(split), static_cast<uint64_t>(step),
           static_cast<uint64_t>(index)});
  tasks_.fill(rng, n, tokens, tags);
  return ok_status();
}

Expected<std::shared_ptr<ShardSource>> ShardSource::open(const std::vector<std::string>& paths,
                                                         double eval_fraction, int64_t window) {
  auto src = std::make_shared<ShardSource>();
  src->eval_fraction_ = eval_fraction;
  for (const std::string& p : paths) {
    HYDRA_ASSIGN_OR_RETURN(TokenShard s, TokenShard::open(p));
    if (src->shards_.empty()) {
      src->tokenizer_ = s.tokenizer();
    } else if (s.tokenizer() != src->tokenizer_) {
      return invalid_argument(p + ": tokenized with " + s.tokenizer() + " but " + paths[0] +
                              " with " + src->tokenizer_ +
                              "; all shards of a run need one tokenizer");
    }
    src->vocab_ = std::max(src->vocab_, s.vocab_size());
    const int64_t train = static_cast<int64_t>(double(s.num_tokens()) * (1.0 - eval_fraction));
    if (train < window || s.num_tokens() - train < (eval_fraction > 0 ? window : 0))
      return invalid_argument(p + ": " + std::to_string(s.num_tokens()) +
                              " tokens is too few for windows of " + std::to_string(window) +
                              " in both the training and the evaluation part (eval_fraction " +
                              std::to_string(eval_fraction) + ")");
    src->train_tokens_.push_back(train);
    src->shards_.push_back(std::move(s));
  }
  if (src->shards_.empty()) return invalid_argument("data.shards: no token shards given");
  return src;
}

std::string ShardSource::describe() const {
  int64_t total = 0;
  for (const auto& s : shards_) total += s.num_tokens();
  std::ostringstream os;
  os << shards_.size() << " token shards, " << total << " tokens, tokenizer " << tokenizer_;
  return os.str();
}

Status ShardSource::fill(Split split, uint64_t seed, int64_t step, int64_t index, int64_t n,
                         int32_t* tokens, TokenTags tags) const {
  Rng rng({seed, static_cast<uint64_t>(split), static_cast<uint64_t>(step),
           static_cast<uint64_t>(index)});
  // A shard in proportion to its size, then a window start within its part of the split.
  std::vector<int64_t> sizes;
  for (std::size_t i = 0; i < shards_.size(); ++i)
    sizes.push_back(split == Split::kTrain ? train_tokens_[i]
                                           : shards_[i].num_tokens() - train_tokens_[i]);
  int64_t total = 0;
  for (int64_t s : sizes) total += std::max<int64_t>(0, s - n + 1);
  if (total <= 0)
    return failed_precondition("no " +
                               std::string(split == Split::kTrain ? "training" : "evaluation") +
                               " window of " + std::to_string(n) + " tokens fits in the shards");
  int64_t pick = rng.below(total);
  for (std::size_t i = 0; i < shards_.size(); ++i) {
    const int64_t starts = std::max<int64_t>(0, sizes[i] - n + 1);
    if (pick < starts) {
      const int64_t base = split == Split::kTrain ? 0 : train_tokens_[i];
      for (int8_t* tag : {tags.answer, tags.level, tags.domain})
        std::fill(tag, tag + n, int8_t{-1});
      return shards_[i].read(base + pick, n, tokens);
    }
    pick -= starts;
  }
  return internal_error("shard window selection fell through");
}

Loader::Loader(std::shared_ptr<const DataSource> source, LoaderOptions options)
    : source_(std::move(source)), opt_(options) {
  if (opt_.prefetch > 0) thread_ = std::thread([this] { worker(); });
}

Loader::~Loader() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

Expected<Batch> Loader::build(int64_t step) const {
  Batch b;
  b.step = step;
  b.batch = opt_.count;
  b.len = opt_.seq_len;
  const int64_t L = opt_.seq_len, n = L + 1;
  // A batch larger than the machine's memory is refused before its buffers are allocated: resize()
  // writes every page, so with the kernel's overcommit such a batch would end in the OOM killer
  // rather than std::bad_alloc (and a sanitizer's heap aborts on it).
  const double bytes = double(b.batch) * double(L) *
                       double(sizeof(b.tokens[0]) + sizeof(b.targets[0]) + sizeof(b.answer[0]) +
                              sizeof(b.level[0]) + sizeof(b.domain[0]));
  const double memory = physical_memory_bytes();
  if (memory > 0 && bytes > memory) throw std::bad_alloc();
  b.tokens.resize(b.batch * L);
  b.targets.resize(b.batch * L);
  b.answer.resize(b.batch * L);
  b.level.resize(b.batch * L);
  b.domain.resize(b.batch * L);
  std::vector<int32_t> tok(n);
  std::vector<int8_t> ans(n), lvl(n), dom(n);
  for (int64_t i = 0; i < b.batch; ++i) {
    HYDRA_RETURN_IF_ERROR(source_->fill(opt_.split, opt_.seed, step, opt_.first + i, n, tok.data(),
                                        {ans.data(), lvl.data(), dom.data()}));
    for (int64_t t = 0; t < L; ++t) {
      b.tokens[i * L + t] = tok[t];
      b.targets[i * L + t] = tok[t + 1];
      b.answer[i * L + t] = ans[t + 1];
      b.level[i * L + t] = lvl[t + 1];
      b.domain[i * L + t] = dom[t];
    }
  }
  return b;
}

void Loader::worker() {
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    cv_.wait(lock, [this] {
      return stop_ || (next_step_ >= 0 && static_cast<int64_t>(ready_.size()) < opt_.prefetch);
    });
    if (stop_) return;
    const int64_t step = next_step_++;
    const uint64_t generation = generation_;
    building_ = step;
    lock.unlock();
    Expected<Batch> b = build_caught(step);
    lock.lock();
    building_ = -1;
    if (generation != generation_) continue;  // superseded by a jump to another step
    ready_.emplace_back(step, std::move(b));
    cv_.notify_all();
  }
}

// build() with its exceptions turned into errors: on the prefetch thread an exception would end the
// process (std::terminate); as an error it reaches get() and the trainer's message.
Expected<Batch> Loader::build_caught(int64_t step) const {
  try {
    return build(step);
  } catch (const std::bad_alloc&) {
    return failed_precondition(
        "data loader: out of host memory building the batch of step " + std::to_string(step) +
        " (" + std::to_string(opt_.count) + " sequences of " + std::to_string(opt_.seq_len) +
        " tokens); lower train.batch_size or train.seq_len, or raise train.grad_accum");
  } catch (const std::exception& e) {
    return internal_error("data loader: building the batch of step " + std::to_string(step) +
                          " failed: " + e.what());
  }
}

Expected<Batch> Loader::get(int64_t step) {
  if (opt_.prefetch <= 0) return build_caught(step);
  std::unique_lock<std::mutex> lock(mu_);
  while (!ready_.empty() && ready_.front().first < step) ready_.pop_front();
  const bool coming = ready_.empty() ? (building_ == step || (building_ < 0 && next_step_ == step))
                                     : ready_.front().first == step;
  if (!coming) {  // a jump: forget what was prepared and start over at `step`
    ++generation_;
    ready_.clear();
    next_step_ = step;
    cv_.notify_all();
  }
  cv_.wait(lock, [&] { return !ready_.empty() && ready_.front().first == step; });
  Expected<Batch> out = std::move(ready_.front().second);
  ready_.pop_front();
  cv_.notify_all();
  return out;
}

}  // namespace hydra::data
