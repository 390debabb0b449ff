// Evaluation on held-out batches: the loss, each task's accuracy (and per difficulty level), the
// chance level of each task, and the experts' routing purity on the mixture's domains. Every rank
// evaluates its part of each batch (its sequences, its sequence shard) into an EvalTally; the
// tallies are summed over the ranks in one all-reduce, and the result is computed from the sums.
#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <sstream>

#include "autograd/grad_mode.h"
#include "autograd/ops.h"
#include "data/tokenizer.h"
#include "trainer/distributed.h"
#include "trainer/trainer.h"

namespace hydra::trainer {
namespace {

constexpr int K = data::kNumTasks, NL = data::kNumLevels;
constexpr int kDomains = 3;  // the mixture task's domains (data::TokenTags::domain)

// What evaluation counts, on one rank and then over all of them.
struct EvalTally {
  EvalTally(int64_t blocks, int64_t experts, int64_t vocab)
      : blocks(blocks),
        experts(experts),
        vocab(vocab),
        domain_experts(kDomains * blocks * experts, 0.0),
        task(vocab) {}

  int64_t blocks, experts, vocab;
  double loss_sum = 0;  // the token losses
  double targets = 0;   // tokens with a target (the loss's denominator)
  double tokens = 0;
  double target_bytes = 0;  // the targets' bytes, where known
  bool bytes_known = true;  // every batch's targets had their bytes counted
  // [domain][block][expert]: the domain's whole chunks routed to the expert.
  std::vector<double> domain_experts;
  AnswerTally task;

  // Per domain, the experts that block `blk`'s routing gave the domain's whole chunks.
  void count_routing(const data::Batch& b, int64_t blk, const model::MoeRouting& rt) {
    if (rt.batch != b.batch) return;
    for (int64_t s = 0; s < rt.batch; ++s)
      for (int64_t c = 0; c < rt.num_chunks; ++c) {
        const int d = b.domain[s * b.len + c * rt.chunk];
        bool pure = d >= 0;
        for (int64_t k = 0; k < rt.chunk && pure; ++k)
          pure = b.domain[s * b.len + c * rt.chunk + k] == d;
        if (!pure) continue;
        for (int64_t e = 0; e < rt.num_experts; ++e)
          domain_experts[(d * blocks + blk) * experts + e] +=
              rt.active[(s * rt.num_chunks + c) * rt.num_experts + e];
      }
  }

  void sum_over_ranks(const parallel::ProcessGrid& grid) {
    parallel::HostSum sums;
    sums.add(loss_sum)
        .add(targets)
        .add(tokens)
        .add(target_bytes)
        .add(task.answers)
        .add(task.correct);
    sums.add(task.level_answers).add(task.level_correct).add(domain_experts).add(task.seen);
    sums.sum(grid.distributed() ? &grid.world() : nullptr);
  }

  EvalResult result() const {
    EvalResult r;
    r.loss = targets > 0 ? loss_sum / targets : NAN;
    r.perplexity = std::exp(r.loss);
    r.tokens = static_cast<int64_t>(tokens);
    r.bits_per_byte =
        bytes_known && target_bytes > 0 ? loss_sum / std::log(2.0) / target_bytes : NAN;
    for (int k = 0; k < K; ++k) {
      const double n_k = task.answers[k];
      r.answers[k] = static_cast<int64_t>(n_k);
      r.accuracy[k] = n_k > 0 ? task.correct[k] / n_k : NAN;
      for (int64_t l = 0; l < NL; ++l) {
        const double n_l = task.level_answers[k * NL + l];
        r.level_answers[k][l] = static_cast<int64_t>(n_l);
        r.level_accuracy[k][l] = n_l > 0 ? task.level_correct[k * NL + l] / n_l : NAN;
      }
      int64_t distinct = 0;
      for (int64_t v = 0; v < vocab; ++v) distinct += task.seen[k * vocab + v] > 0;
      r.chance[k] = distinct == 0 ? NAN : 1.0 / double(distinct);
    }
    // Purity: per block and domain, the most used expert's share of the domain's assignments.
    double purity = 0;
    int64_t n = 0;
    for (int d = 0; d < kDomains; ++d)
      for (int64_t blk = 0; blk < blocks; ++blk) {
        double total = 0, most = 0;
        for (int64_t e = 0; e < experts; ++e) {
          total += domain_experts[(d * blocks + blk) * experts + e];
          most = std::max(most, domain_experts[(d * blocks + blk) * experts + e]);
        }
        if (total > 0) {
          purity += most / total;
          ++n;
        }
      }
    r.routing_purity = n > 0 ? purity / double(n) : NAN;
    return r;
  }
};

// A token that decodes to text of its own whatever follows it (not a space, not empty: decoding
// `anchor, ids` then counts every byte of ids, where SentencePiece drops the space a sequence
// starts with); -1 when none is found.
int32_t decoding_anchor(const data::Tokenizer& tok) {
  for (int32_t id = 0; id < static_cast<int32_t>(std::min<int64_t>(tok.vocab_size(), 4096)); ++id) {
    const std::string one = tok.decode({id}), two = tok.decode({id, id});
    if (!one.empty() && !std::isspace(static_cast<unsigned char>(one[0])) && two == one + one)
      return id;
  }
  return -1;
}

// The held-out targets' bytes: the synthetic tasks' tokens are bytes; shards' tokens are decoded
// by `tok` (their tokenizer), one sequence at a time after `anchor`; without one the bytes are
// unknown.
void count_target_bytes(const data::Batch& b, bool synthetic, const data::Tokenizer* tok,
                        int32_t anchor, EvalTally& tally) {
  constexpr int64_t kIgnore = model::LanguageModel::kIgnoreIndex;
  if (synthetic) {
    for (int64_t t : b.targets) tally.target_bytes += t != kIgnore;
    return;
  }
  if (tok == nullptr) {
    tally.bytes_known = false;
    return;
  }
  const std::size_t anchor_bytes = anchor >= 0 ? tok->decode({anchor}).size() : 0;
  std::vector<int32_t> ids;
  for (int64_t s = 0; s < b.batch; ++s) {
    ids.clear();
    if (anchor >= 0) ids.push_back(anchor);
    for (int64_t t = 0; t < b.len; ++t)
      if (const int64_t id = b.targets[s * b.len + t]; id != kIgnore)
        ids.push_back(static_cast<int32_t>(id));
    tally.target_bytes += static_cast<double>(tok->decode(ids).size() - anchor_bytes);
  }
}

}  // namespace

void AnswerTally::count(const data::Batch& b, const std::vector<int64_t>& predicted) {
  HYDRA_CHECK(predicted.size() == b.targets.size() && b.answer.size() == b.targets.size())
      << "AnswerTally: " << predicted.size() << " predictions, " << b.answer.size()
      << " answer tags for " << b.targets.size() << " targets";
  for (std::size_t t = 0; t < b.answer.size(); ++t) {
    const int k = b.answer[t];
    if (k < 0) continue;
    const bool right = predicted[t] == b.targets[t];
    answers[k] += 1;
    correct[k] += right;
    if (const int level = b.level[t]; level >= 0 && level < NL) {
      level_answers[k * NL + level] += 1;
      level_correct[k * NL + level] += right;
    }
    if (b.targets[t] >= 0 && b.targets[t] < vocab) seen[k * vocab + b.targets[t]] = 1;
  }
}

Expected<EvalResult> Trainer::evaluate(const Stage& stage) {
  NoGradGuard ng;
  data::LoaderOptions lo;
  lo.seed = state_.data_seed;
  lo.global_batch = stage.batch;
  lo.count = stage.batch / grid_->data_ranks();
  lo.first = grid_->data_rank() * lo.count;
  lo.seq_len = stage.seq_len;
  lo.prefetch = 0;
  lo.split = data::Split::kEval;
  data::Loader loader(make_source(stage, stage.seq_len + 1), lo);
  const int64_t blocks = static_cast<int64_t>(model_->routings().size());
  EvalTally tally(blocks, spec_.num_experts, spec_.vocab);
  if (shard_source_ && !eval_tokenizer_tried_) {  // the shards' tokenizer, for bits per byte
    eval_tokenizer_tried_ = true;
    if (auto t = text_tokenizer(); t.ok()) {
      eval_tokenizer_ = std::move(*t);
      eval_anchor_ = decoding_anchor(*eval_tokenizer_);
    }
  }
  const int64_t batches = cfg_.train().eval_batches();
  for (int64_t i = 0; i < batches; ++i) {
    HYDRA_ASSIGN_OR_RETURN(data::Batch loaded, loader.get(i));
    const data::Batch b = sequence_shard(std::move(loaded), grid_->sp_rank(), grid_->shape().sp);
    model::ForwardContext ctx;
    ctx.paths = stage.paths;
    ctx.grid = grid_.get();
    ctx.lm_tokens = 1;  // lm_loss = the sum of this rank's token losses
    ctx.pos0 = grid_->sp_rank() * b.len;
    const Tensor tokens = tensor(b.tokens, {b.batch, b.len}).to(device_);
    const Tensor targets = tensor(b.targets, {b.batch, b.len}).to(device_);
    const ComputeCopies::Scope compute(compute_copies_.get());
    const model::LmOutput out = model_->forward(tokens, targets, ctx, true);
    tally.loss_sum += out.lm_loss.item<double>();
    for (int64_t t : b.targets) tally.targets += t != model::LanguageModel::kIgnoreIndex;
    count_target_bytes(b, shard_source_ == nullptr, eval_tokenizer_.get(), eval_anchor_, tally);
    tally.tokens += double(b.batch * b.len);
    const auto [best, idx] = topk(out.logits, 1);
    tally.task.count(b, idx.to_vector<int64_t>());
    if (stage.paths.moe_routing) {
      const std::vector<const model::MoeRouting*> routings = model_->routings();
      for (int64_t blk = 0; blk < blocks; ++blk) tally.count_routing(b, blk, *routings[blk]);
    }
  }
  tally.sum_over_ranks(*grid_);
  return tally.result();
}

Expected<std::unique_ptr<data::Tokenizer>> Trainer::text_tokenizer() const {
  if (!cfg_.data().tokenizer().empty()) return data::load_tokenizer(cfg_.data().tokenizer());
  const auto* shards = dynamic_cast<const data::ShardSource*>(shard_source_.get());
  if (shard_source_ == nullptr || (shards != nullptr && shards->tokenizer() == "bytes"))
    return data::load_tokenizer("bytes");  // the synthetic tasks are byte tokens
  return invalid_argument(
      "the run's shards were made with tokenizer '" +
      (shards != nullptr ? shards->tokenizer() : std::string("?")) +
      "' and data.tokenizer does not name its file: pass --set data.tokenizer=FILE");
}

const Stage& Trainer::checkpoint_stage() const {
  HYDRA_CHECK(opt_.evaluate_only) << "checkpoint_stage: create the trainer with evaluate_only";
  // The stage of the step that led to the checkpoint, as training evaluates right after a step.
  const int64_t last = std::max<int64_t>(state_.step - 1, 0);
  for (const Stage& s : stages_)
    if (last >= s.start && last < s.start + s.steps) return s;
  return stages_.back();
}

Expected<EvalResult> Trainer::evaluate_checkpoint() {
  const Stage& stage = checkpoint_stage();
  HYDRA_ASSIGN_OR_RETURN(EvalResult r, evaluate(stage));
  r.step = state_.step;
  r.stage = stage.name;
  return r;
}

std::string task_accuracy_table(const EvalResult& r) {
  std::ostringstream os;
  char line[160];
  for (int k = 0; k < data::kNumTasks; ++k) {
    if (r.answers[k] == 0) continue;
    if (os.tellp() == 0)
      os << "  task accuracy on held-out answers (chance = 1 / distinct answers):\n";
    std::snprintf(line, sizeof line, "    %-9s %6.1f%%  (chance %4.1f%%, %ld answers)",
                  data::task_name(k), 100 * r.accuracy[k], 100 * r.chance[k], long(r.answers[k]));
    os << line;
    const char* sep = "  ";
    for (int l = 0; l < data::kNumLevels; ++l) {
      if (r.level_answers[k][l] == 0) continue;
      std::snprintf(line, sizeof line, "%s%s %.1f%%", sep, data::level_name(k, l).c_str(),
                    100 * r.level_accuracy[k][l]);
      os << line;
      sep = ", ";
    }
    os << "\n";
  }
  return os.str();
}

}  // namespace hydra::trainer
