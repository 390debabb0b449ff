// The training loop, top to bottom in Trainer::run(): for each step, the curriculum stage
// (begin_stage), the step itself (train_step: the batch, forward and backward over micro-batches,
// the NaN guard, gradient clipping, AdamW), its metrics (step_metrics), evaluation when due
// (evaluate_into; trainer/evaluation.cpp), the metrics line (log_metrics) and a checkpoint when due
// (maybe_save). Resuming restores everything a step depends on, so N straight steps equal N/2 +
// resume + N/2 bit for bit.
#pragma once

#include <array>
#include <cmath>
#include <map>
#include <memory>
#include <set>
#include <string>

#include "autograd/compute_copies.h"
#include "data/loader.h"
#include "data/tokenizer.h"
#include "kernels/device_trace.h"
#include "model/lm.h"
#include "parallel/grid.h"
#include "parallel/reducer.h"
#include "trainer/checkpoint.h"
#include "trainer/curriculum.h"
#include "trainer/metrics.h"
#include "trainer/optimizer.h"

namespace hydra::trainer {

struct TrainOptions {
  std::string out_dir;
  std::string resume;  // "": a new run; "auto": the newest checkpoint in out_dir; else a checkpoint
                       // or run dir
  int64_t stop_step = -1;      // --steps: the step count to reach (default: train.steps)
  bool quiet = false;          // no progress output (tests)
  bool local_only = false;     // one process even when MPI is up (tests compare against it)
  bool evaluate_only = false;  // hydra-eval: load `resume`, write nothing (evaluate_checkpoint)
  // --force: resume from a checkpoint older than the run's newest, starting a new branch (the newer
  // checkpoints and their metrics move to out_dir/abandoned/branch-N/; lineage.jsonl records it).
  bool force = false;
};

struct EvalResult {
  double loss = 0, perplexity = 0;
  std::array<double, data::kNumTasks> accuracy{};  // NaN when a task had no answers
  std::array<double, data::kNumTasks> chance{};    // 1 / distinct answer tokens seen
  std::array<int64_t, data::kNumTasks> answers{};
  // Per difficulty level (data::level_name): accuracy (NaN where none) and answers.
  std::array<std::array<double, data::kNumLevels>, data::kNumTasks> level_accuracy{};
  std::array<std::array<int64_t, data::kNumLevels>, data::kNumTasks> level_answers{};
  // Bits per byte of the held-out text: the loss over the targets' bytes (their tokenizer's
  // decoding). NaN when the bytes are unknown: shards of a tokenizer other than bytes with no
  // data.tokenizer to decode them, or a SentencePiece library that cannot be opened.
  double bits_per_byte = NAN;
  double routing_purity = 0;  // mixture domains: share of a domain's chunks on its most used expert
  int64_t tokens = 0;         // 0: no evaluation ran
  int64_t step = -1;          // the step it ran after
  std::string stage;          // the curriculum stage whose paths and lengths it used
};

// Evaluation's count of task answers: at exactly the positions t whose target is an answer
// (data::Batch::answer[t] >= 0), whether the prediction for t (the model's top-1 next token) is
// that target; per task, per difficulty level, and which tokens were some task's answer (chance).
struct AnswerTally {
  explicit AnswerTally(int64_t vocab) : vocab(vocab), seen(data::kNumTasks * vocab, 0.0) {}
  void count(const data::Batch& b, const std::vector<int64_t>& predicted);

  int64_t vocab;
  std::array<double, data::kNumTasks> answers{}, correct{};
  std::array<double, data::kNumTasks * data::kNumLevels> level_answers{},
      level_correct{};       // [task][level]
  std::vector<double> seen;  // [task][token]: > 0 where the token answered an episode of the task
};

// The task accuracy table of a report (hydra-train's, hydra-eval's): a line per task that had
// answers, its difficulty levels beside it; "" when no task had answers.
std::string task_accuracy_table(const EvalResult& r);

struct TrainSummary {
  std::string run_dir, checkpoint, metrics;
  int64_t first_step = 0, last_step = 0;
  double first_loss = 0, last_loss = 0;  // LM loss of the first step run, mean of the last ten
  double tokens_per_s = 0;               // median over steps
  double elapsed_s = 0;                  // the whole run's, earlier legs (before resumes) included
  double leg_s = 0;                      // this process's: steps first_step -> last_step
  EvalResult eval;
  std::vector<std::string> stage_log;
  bool interrupted = false;
  int signal = 0;
  std::vector<double> save_stall_s;  // how long each save of this leg held training up
  kernels::TraceSummary trace;       // HYDRA_TRACE: the device's time over the steps traced
  int64_t queued_ahead = 0;  // steps queued before the step before them was read (overlap_steps)
};

class Trainer {
 public:
  // cfg: overrides already applied; source: the config file, for messages.
  static Expected<std::unique_ptr<Trainer>> create(const config::RunConfig& cfg,
                                                   const std::string& source,
                                                   const TrainOptions& options);
  Expected<TrainSummary> run();
  // The checkpoint loaded by TrainOptions::resume (evaluate_only), evaluated as training would at
  // its step: the stage of the step before it, train.eval_batches
  // held-out batches. Every rank calls it.
  Expected<EvalResult> evaluate_checkpoint();
  const std::string& checkpoint() const { return resume_from_; }
  // The curriculum stage of the loaded checkpoint's last step (evaluate_only): its paths are the
  // ones the model was trained with when it was saved.
  const Stage& checkpoint_stage() const;
  int64_t checkpoint_step() const { return state_.step; }
  // The model's compute copies under BF16_MIXED (enter a ComputeCopies::Scope around a forward);
  // null otherwise.
  ComputeCopies* compute_copies() const { return compute_copies_.get(); }
  Device device() const { return device_; }
  // The tokenizer of the run's text: data.tokenizer when set, else bytes for the built-in
  // synthetic tasks and for byte shards; an error saying to set data.tokenizer otherwise.
  Expected<std::unique_ptr<data::Tokenizer>> text_tokenizer() const;
  model::LanguageModel& model() { return *model_; }
  const config::RunConfig& config() const { return cfg_; }
  const AdamW& optimizer() const { return *optimizer_; }
  const parallel::GradientReducer* reducer() const {
    return reducer_.get();
  }  // null in one process

 private:
  Trainer() = default;
  Status prepare();
  Status prepare_model();
  Status enter_stage(const Stage& stage);
  Expected<EvalResult> evaluate(const Stage& stage);

  // One call of run() (trainer.cpp), and the parts of its loop in the order they run.
  struct Leg;
  struct QueuedStep;
  struct StepOutcome;
  Expected<std::unique_ptr<Leg>> start_leg();
  Status begin_stage(const Stage& stage, Leg& leg);
  Expected<QueuedStep> queue_step(const Stage& stage, int64_t step, Leg& leg);
  bool may_queue_after(int64_t step, const Leg& leg) const;
  bool collects_stats(int64_t step, const Leg& leg) const;
  bool evaluates_at(int64_t steps, bool last) const;
  Expected<StepOutcome> read_step(const QueuedStep& q, const Stage& stage, Leg& leg);
  MetricValues step_metrics(StepOutcome& step, const Stage& stage, Leg& leg);
  void warn_dead_layers(const std::map<std::string, double>& stats, Leg& leg);
  Status evaluate_into(const Stage& stage, MetricValues* values, Leg& leg);
  void log_metrics(const StepOutcome& step, const Stage& stage, const MetricValues& values,
                   bool evaluated, Leg& leg);
  int agreed_signal() const;
  Status train_steps(Leg& leg);
  // Whether the boundary after `step` steps (-1: state_.step) saves.
  bool save_due(bool last, int sig, int64_t step = -1) const;
  Expected<bool> maybe_save(bool last, int sig, Leg& leg);
  Status poll_pending_save(Leg& leg);
  Status publish_pending_save(Leg& leg);
  void stop_on_signal(int sig, bool saved, Leg& leg);
  void start_trace(Leg& leg);
  void finish_trace(Leg& leg);
  TrainSummary finish_leg(Leg& leg);
  std::string grid_banner() const;
  std::string placement_warning() const;
  double peak_tflops() const;                               // the MFU's denominator (0: unknown)
  bool lead() const { return grid_->world().rank() == 0; }  // rank 0 writes metrics and prints
  std::shared_ptr<const data::DataSource> make_source(const Stage& stage, int64_t window) const;

  config::RunConfig cfg_;
  std::string source_;
  TrainOptions opt_;
  model::ModelSpec spec_;
  std::set<std::string> dead_layers_warned_;   // MoE layers already reported as routing nothing
  std::map<int64_t, double> flops_per_token_;  // model FLOPs a token by stage index (step_metrics)
  std::vector<Stage> stages_;
  std::unique_ptr<model::LanguageModel> model_;
  std::unique_ptr<AdamW> optimizer_;
  std::unique_ptr<CheckpointManager> checkpoints_;
  std::unique_ptr<data::Loader> loader_;
  std::shared_ptr<const data::DataSource> shard_source_;  // when data.shards is set
  // Decodes held-out targets to count their bytes (bits per byte); loaded at the first evaluation
  // on shards. null: unknown (evaluation reports no bits per byte).
  std::unique_ptr<data::Tokenizer> eval_tokenizer_;
  bool eval_tokenizer_tried_ = false;
  int32_t eval_anchor_ = -1;  // evaluation.cpp: decoding_anchor
  TrainState state_;
  Device device_ = Device::cpu();
  std::unique_ptr<parallel::ProcessGrid> grid_;         // a grid of one in a single process
  std::unique_ptr<parallel::GradientReducer> reducer_;  // distributed runs
  std::unique_ptr<ComputeCopies> compute_copies_;  // BF16_MIXED: bf16 copies of the fp32 parameters
  int64_t current_stage_ = -1;
  int stop_signal_ = 0;  // a signal agreed on while a step was queued ahead: none is queued after
  std::string resume_from_;
  // Run lineage: the checkpoints newer than the one resumed from (--force: moved aside when the run
  // directory is prepared), and the branch this leg trains (0: the run's first; lineage.jsonl).
  std::vector<std::string> abandoned_;
  bool restarted_ = false;  // --resume auto on a run that published no checkpoint: from step 0
  int64_t branch_ = 0;
  Status start_branch();
};

}  // namespace hydra::trainer
