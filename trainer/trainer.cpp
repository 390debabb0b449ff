#include "trainer/trainer.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <optional>
#include <set>
#include <sstream>

#include "autograd/cuda_context.h"
#include "autograd/grad_mode.h"
#include "autograd/ops.h"
#include "autograd/profiler.h"
#include "base/determinism.h"
#include "configs/config_io.h"
#include "data/tokenizer.h"
#include "kernels/conv1d.h"
#include "kernels/device_runtime.h"
#include "kernels/device_trace.h"
#include "model/params.h"
#include "parallel/runtime.h"
#include "trainer/distributed.h"
#include "trainer/schedule.h"
#include "trainer/step.h"

namespace hydra::trainer {

// The MFU denominator on CUDA when train.peak_tflops is 0: H100/H200 SXM dense bf16.
constexpr double kDefaultCudaPeakTflops = 989.0;

namespace fs = std::filesystem;

namespace {

std::atomic<int> g_signal{0};
extern "C" void on_signal(int sig) { g_signal.store(sig); }

double peak_rss_mb() {
  std::ifstream in("/proc/self/status");
  std::string key;
  while (in >> key) {
    if (key == "VmHWM:") {
      double kb = 0;
      in >> kb;
      return kb / 1024.0;
    }
    std::string rest;
    std::getline(in, rest);
  }
  return 0;
}

std::string paths_str(const model::PathSwitches& p) {
  std::string s = "ssm";
  if (p.sga) s += "+sga";
  s += p.moe_routing ? "+moe(routed)" : "+moe(dense)";
  if (p.workspace) s += "+workspace";
  if (p.pkm) s += "+pkm";
  return s;
}

}  // namespace

namespace {
// What to do after a non-finite loss or gradient. `good`: the newest checkpoint whose next step
// gave a finite loss and gradient in this run (resuming from it repeats that step: the advice is
// true); `suspect`: a newer one whose next step is the one that failed (its weights give this
// loss, so it is not named as good). Either may be empty.
std::string diverged_advice(const std::string& good, const std::string& suspect) {
  std::string out;
  if (!suspect.empty())
    out = "The newest checkpoint, " + suspect +
          ", holds the weights this step started from, so resuming from it fails the same way. ";
  // A checkpoint newer than the good one stands in the way of resuming from it (run lineage):
  // --force moves it aside.
  if (!good.empty() && std::filesystem::exists(good + "/manifest.pb"))
    return out + "The last good checkpoint is " + good + ": resume from it with --resume " + good +
           (suspect.empty() ? "" : " --force") +
           " and a lower learning rate (--set train.lr.lr=...)";
  if (!good.empty())
    return out + "The last good checkpoint, " + good +
           ", was removed by train.keep_last; resume from an older checkpoint of an earlier run, "
           "or "
           "start again, with a lower learning rate (--set train.lr.lr=...) and train.keep_last >= "
           "2";
  if (!suspect.empty())
    return out +
           "No checkpoint of this run is known to give a finite next step: resume from an "
           "older checkpoint of an earlier run, or start again (a new --out), with a lower "
           "learning rate (--set train.lr.lr=...)";
  return "No checkpoint was written yet: start the run again (a new --out, or remove this one) "
         "with a lower learning rate (--set train.lr.lr=...)";
}
}  // namespace

Expected<std::unique_ptr<Trainer>> Trainer::create(const config::RunConfig& cfg_in,
                                                   const std::string& source,
                                                   const TrainOptions& options) {
  std::unique_ptr<Trainer> t(new Trainer());
  t->cfg_ = cfg_in;
  resolve_run_config(&t->cfg_);
  HYDRA_RETURN_IF_ERROR(config::check_finite_numbers(t->cfg_, source));
  t->source_ = source;
  t->opt_ = options;
  HYDRA_ASSIGN_OR_RETURN(t->spec_, model::make_spec(t->cfg_.model(), source));
  HYDRA_RETURN_IF_ERROR(model::check_fits_in_memory(
      t->spec_,
      std::max<int64_t>(
          1, t->cfg_.parallel().dp() * t->cfg_.parallel().ep() * t->cfg_.parallel().sp()),
      t->cfg_.train().device() == "cuda", source));
  HYDRA_ASSIGN_OR_RETURN(t->stages_, resolve_stages(t->cfg_, t->spec_, source));
  if (options.stop_step == 0 || options.stop_step < -1)
    return invalid_argument("--steps " + std::to_string(options.stop_step) + ": must be >= 1");
  const auto& p = t->cfg_.parallel();
  const parallel::GridShape shape{p.dp(), p.ep(), p.sp()};
  const bool distributed = parallel::process_info().distributed && !options.local_only;
  if (shape.size() > 1 && !distributed)
    return invalid_argument(
        source + ": parallel { " + shape.str() + " } needs " + std::to_string(shape.size()) +
        " processes; this is a single process (start it with mpirun -np " +
        std::to_string(shape.size()) + " or srun -n " + std::to_string(shape.size()) + ")");
  const bool gpu = t->cfg_.train().device() == "cuda";
  if (!gpu && p.comm() == config::ParallelConfig::NCCL)
    return invalid_argument(
        source +
        ": parallel.comm = NCCL moves CUDA tensors, but train.device = cpu; use "
        "parallel.comm = MPI (or AUTO), or train.device = cuda");
  if (gpu && t->spec_.conv_width > kernels::kCudaMaxConvWidth)
    return invalid_argument(
        source + ": model.ssm.conv_width = " + std::to_string(t->spec_.conv_width) +
        ": the CUDA kernels take widths up to " + std::to_string(kernels::kCudaMaxConvWidth) +
        "; use a narrower convolution, or train.device = cpu");
  if (gpu) {
    if (!cuda_available())
      return failed_precondition(
          source +
          ": train.device = cuda but no CUDA device is available (or this build has "
          "no CUDA backend); use --set train.device=cpu");
    t->device_ = Device::cuda(distributed ? parallel::device_for_rank() : 0);
  }
  if (distributed) {
    const parallel::CommBackend backend =
        p.comm() == config::ParallelConfig::MPI    ? parallel::CommBackend::kMpi
        : p.comm() == config::ParallelConfig::NCCL ? parallel::CommBackend::kNccl
                                                   : parallel::CommBackend::kAuto;
    if (gpu && backend != parallel::CommBackend::kMpi)
      if (const std::string problem = parallel::nccl_placement_problem(); !problem.empty())
        return failed_precondition(source + ": train.device = cuda with parallel.comm = " +
                                   config::ParallelConfig::Comm_Name(p.comm()) + ": " + problem);
    auto world = parallel::world_communicator(gpu, backend);
    world->set_timeout(std::chrono::seconds(static_cast<int64_t>(std::ceil(p.timeout_s()))));
    HYDRA_RETURN_IF_ERROR(parallel::check_same_config(*world, config::to_text(t->cfg_), source));
    HYDRA_ASSIGN_OR_RETURN(t->grid_,
                           parallel::ProcessGrid::create(std::move(world), shape, source));
  } else {
    t->grid_ = parallel::ProcessGrid::single(t->device_);
  }
  // After the grid: a world of the wrong size is the first thing to fix.
  HYDRA_RETURN_IF_ERROR(validate_parallel(t->cfg_, t->spec_, t->stages_, source));
  if (t->cfg_.train().precision() == config::TrainConfig::FP64 && t->device_.is_cuda())
    return invalid_argument(source + ": train.precision = FP64 is for the CPU (use FP32 on CUDA)");
  if (t->cfg_.train().precision() == config::TrainConfig::BF16_MIXED && t->device_.is_cpu())
    return invalid_argument(
        source +
        ": train.precision = BF16_MIXED runs on CUDA only (the CPU backend computes in "
        "f32/f64); use train.precision = FP32 or train.device = cuda");
  set_deterministic(t->cfg_.train().deterministic());
  // Data: shards are opened once (and checked) here; synthetic sources are made per stage (data
  // mix).
  if (t->cfg_.data().shards_size() > 0) {
    HYDRA_ASSIGN_OR_RETURN(
        std::vector<std::string> paths,
        data::expand_shard_paths({t->cfg_.data().shards().begin(), t->cfg_.data().shards().end()}));
    int64_t longest = 0;
    for (const Stage& s : t->stages_) longest = std::max(longest, s.seq_len);
    HYDRA_ASSIGN_OR_RETURN(
        auto src, data::ShardSource::open(paths, t->cfg_.data().eval_fraction(), longest + 1));
    if (src->vocab_size() > t->spec_.vocab)
      return invalid_argument(paths[0] + ": tokens of a vocabulary of " +
                              std::to_string(src->vocab_size()) +
                              " do not fit model.vocab_size = " + std::to_string(t->spec_.vocab));
    if (!t->cfg_.data().tokenizer().empty()) {
      HYDRA_ASSIGN_OR_RETURN(std::string id, data::tokenizer_id(t->cfg_.data().tokenizer()));
      if (id != src->tokenizer())
        return invalid_argument("data.tokenizer " + t->cfg_.data().tokenizer() + " (" + id +
                                ") is not the tokenizer the shards were made with (" +
                                src->tokenizer() + ")");
    }
    t->shard_source_ = src;
  } else if (t->spec_.vocab < data::SyntheticTasks::kVocab) {
    return invalid_argument(source + ": model.vocab_size = " + std::to_string(t->spec_.vocab) +
                            " is too small for the built-in synthetic data (byte tokens below " +
                            std::to_string(data::SyntheticTasks::kVocab) + ")");
  }
  // Each phase ends with every rank learning whether any rank failed (no rank waits for one that
  // quit).
  HYDRA_RETURN_IF_ERROR(agree(t->prepare(), *t->grid_));
  HYDRA_RETURN_IF_ERROR(agree(t->prepare_model(), *t->grid_));
  return t;
}

namespace {
// The first of the files a run writes into its directory that `out` holds, or nullptr.
const char* holds_run(const std::string& out) {
  for (const char* marker : {"config.pbtxt", "metrics.jsonl", "checkpoints"})
    if (fs::exists(fs::path(out) / marker)) return marker;
  return nullptr;
}
}  // namespace

// Phase 1: the run directory and what to resume from (no writes yet).
Status Trainer::prepare() {
  const std::string& out = opt_.out_dir;
  if (out.empty()) return invalid_argument("--out: name the run directory");
  std::error_code ec;
  checkpoints_ = std::make_unique<CheckpointManager>(out, cfg_.train().keep_last());
  if (opt_.evaluate_only && opt_.resume.empty())
    return invalid_argument("evaluation needs a checkpoint or a run directory to load");
  if (opt_.resume.empty()) {
    if (const char* marker = holds_run(out))
      return already_exists(out + " holds another run (" + marker +
                            " exists); continue it with --resume auto, or choose a new --out");
  } else if (opt_.resume == "auto") {
    auto latest = checkpoints_->latest();
    if (latest.ok()) {
      resume_from_ = *latest;
    } else if (const auto damaged = checkpoints_->newer_than(-1); !damaged.empty()) {
      return not_found("--resume auto: " + out + " has no complete checkpoint to resume from (" +
                       fs::path(damaged.back()).filename().string() +
                       " has no manifest.pb): name another checkpoint with --resume DIR, or start "
                       "anew with a new --out");
    } else if (holds_run(out)) {
      // Stopped before its first checkpoint was published (a .tmp at most): continuing the run
      // means starting it again, which is what a requeued job asks for.
      restarted_ = true;
    } else {
      return not_found("--resume auto: " + out +
                       " holds no run to resume (no complete checkpoint to resume from): start "
                       "it without --resume");
    }
  } else {
    if (fs::exists(fs::path(opt_.resume) / "manifest.pb")) {
      resume_from_ = opt_.resume;
    } else if (fs::is_directory(fs::path(opt_.resume) / "checkpoints")) {
      auto latest = CheckpointManager(opt_.resume, 1).latest();
      if (!latest.ok())
        return not_found("--resume " + opt_.resume + ": " + latest.status().message());
      resume_from_ = *latest;
    } else {
      return not_found("--resume " + opt_.resume +
                       ": not a checkpoint (no manifest.pb) nor a run directory");
    }
  }
  // Run lineage: resuming from a step older than the run's newest checkpoint abandons those newer
  // ones (and their metrics); without --force that is refused, since a later --resume auto would
  // pick the abandoned branch up again.
  {  // this leg's branch: the branches lineage.jsonl records so far, one more if it starts one
    std::ifstream in(fs::path(out) / "lineage.jsonl");
    for (std::string l; std::getline(in, l);) branch_ += !l.empty();
  }
  if (!resume_from_.empty() && !opt_.evaluate_only) {
    const int64_t step = CheckpointManager::step_of_dir(resume_from_);
    abandoned_ = checkpoints_->newer_than(step);
    if (!abandoned_.empty() && opt_.force) branch_ += 1;
    if (!abandoned_.empty() && !opt_.force) {
      std::string names;
      for (const std::string& d : abandoned_)
        names += (names.empty() ? "" : ", ") + fs::path(d).filename().string();
      return failed_precondition(
          "--resume " + resume_from_ + " (step " + std::to_string(step) + ") is older than " +
          names + " in " + out + ": training on from it would mix two histories, and a later " +
          "--resume auto would pick the newer checkpoints up again. Pass --force to start a new " +
          "branch from step " + std::to_string(step) +
          " (the newer checkpoints and their metrics move to " + out +
          "/abandoned/branch-N/, lineage.jsonl records it), or --resume auto to continue from " +
          "the newest");
    }
  }
  return ok_status();
}

// --force past newer checkpoints (prepare): rank 0 moves them, and the metrics lines of their
// steps, to out/abandoned/branch-N/ and appends the branch to lineage.jsonl. The branch of this leg
// (and of the metrics lines it writes, "branch") was counted in prepare(): 0 for a run that never
// branched.
Status Trainer::start_branch() {
  if (abandoned_.empty() || !lead()) return ok_status();
  const fs::path out = opt_.out_dir, lineage = out / "lineage.jsonl";
  const int64_t step = CheckpointManager::step_of_dir(resume_from_);
  const fs::path dir = out / "abandoned" / ("branch-" + std::to_string(branch_));
  std::error_code ec;
  fs::create_directories(dir / "checkpoints", ec);
  if (ec) return io_error(dir.string() + ": cannot create: " + ec.message());
  std::string moved;
  for (const std::string& d : abandoned_) {
    const fs::path to = dir / "checkpoints" / fs::path(d).filename();
    fs::rename(d, to, ec);
    if (ec) return io_error(d + ": cannot move it to " + to.string() + ": " + ec.message());
    moved += std::string(moved.empty() ? "" : ", ") + "\"" + fs::path(d).filename().string() + "\"";
  }
  // The metrics lines past `step` go with them (MetricsLog::open keeps the ones up to it).
  std::ifstream in(out / "metrics.jsonl");
  std::ofstream gone(dir / "metrics.jsonl");
  for (std::string line; std::getline(in, line);) {
    if (metrics_line_step(line) > step) gone << line << "\n";
  }
  std::ofstream log(lineage, std::ios::app);
  log << "{\"branch\": " << branch_ << ", \"from\": \"" << resume_from_ << "\", \"step\": " << step
      << ", \"abandoned\": [" << moved << "], \"moved_to\": \"" << dir.string() << "\"}\n";
  if (!gone || !log) return io_error(dir.string() + ": cannot write the abandoned branch's record");
  return ok_status();
}

// Phase 2 (after every rank checked the run directory): rank 0 creates it; every rank builds the
// model and the optimizer, and loads the checkpoint when resuming.
Status Trainer::prepare_model() {
  const std::string& out = opt_.out_dir;
  std::error_code ec;
  if (lead() && !opt_.evaluate_only) {
    fs::create_directories(out, ec);
    if (ec) return io_error(out + ": cannot create the run directory: " + ec.message());
  }

  model_ = model::build_model(spec_, cfg_.train().seed());
  if (grid_->shape().ep > 1) model_->shard_experts(grid_->ep_rank(), grid_->shape().ep);
  if (cfg_.train().precision() == config::TrainConfig::FP64) model_->to(DType::kF64);
  if (device_.is_cuda()) model_->to(device_);
  std::map<std::string, double> groups = {{"pkm_values", cfg_.train().optimizer().pkm_value_lr()},
                                          {"moe_router", cfg_.train().optimizer().router_lr()}};
  optimizer_ =
      std::make_unique<AdamW>(model_->named_parameters(), cfg_.train().optimizer(), groups);
  state_.data_seed = cfg_.train().seed() * 1000003ull + 17;
  if (grid_->distributed()) {
    const bool zero1 = cfg_.parallel().zero1();
    reducer_ = make_reducer(*model_, *grid_, cfg_.parallel().bucket_mb(), zero1);
    if (zero1) optimizer_->shard_over(reducer_.get());  // before loading: the moments become ranges
  }
  if (cfg_.train().precision() == config::TrainConfig::BF16_MIXED)
    compute_copies_ = std::make_unique<ComputeCopies>(*model_, DType::kBF16);
  if (!opt_.evaluate_only && !resume_from_.empty()) HYDRA_RETURN_IF_ERROR(start_branch());
  if (!resume_from_.empty()) {
    const Status loaded =
        CheckpointManager::load(resume_from_, cfg_, *model_, *optimizer_, &state_, *grid_);
    if (!loaded.ok() && opt_.resume == "auto") {  // name the next older checkpoint, if there is one
      const int64_t step = std::stoll(fs::path(resume_from_).filename().string().substr(5));
      auto older = checkpoints_->latest(step);
      return Status(
          loaded.code(),
          loaded.message() + (older.ok() ? "; the next older complete checkpoint is " + *older +
                                               ": resume from it with --resume " + *older +
                                               " --force (the damaged one moves to " +
                                               opt_.out_dir + "/abandoned/)"
                                         : "; there is no older complete checkpoint"));
    }
    HYDRA_RETURN_IF_ERROR(loaded);
    default_generator().set_state(state_.rng);
  } else {
    default_generator().set_state({cfg_.train().seed(), 0});
  }
  if (lead() && !opt_.evaluate_only)
    return config::write_text_file((fs::path(out) / "config.pbtxt").string(), cfg_);
  return ok_status();
}

std::shared_ptr<const data::DataSource> Trainer::make_source(const Stage& stage, int64_t) const {
  if (shard_source_) return shard_source_;
  return std::make_shared<data::SyntheticSource>(stage.data_mix);
}

Status Trainer::enter_stage(const Stage& stage) {
  current_stage_ = stage.index;
  state_.stage = stage.index;
  for (const auto& p : model_->named_parameters()) {
    bool frozen = false;
    for (const std::string& g : stage.freeze) frozen = frozen || in_freeze_group(p.name, g);
    optimizer_->set_frozen(p.name, frozen);
  }
  data::LoaderOptions lo;
  lo.seed = state_.data_seed;
  lo.global_batch = stage.batch;
  lo.count = stage.batch / grid_->data_ranks();  // this data rank's sequences of the global batch
  lo.first = grid_->data_rank() * lo.count;
  lo.seq_len = stage.seq_len;
  lo.prefetch = cfg_.data().prefetch();
  loader_.reset();
  loader_ = std::make_unique<data::Loader>(make_source(stage, stage.seq_len + 1), lo);
  return ok_status();
}

// The bookkeeping of one call of run(): a leg of the run, from the step it starts or resumes at to
// the step it stops at.
struct Trainer::Leg {
  Leg(int64_t first, int64_t stop_step, int64_t schedule_end_step, bool speak_, int64_t every)
      : stop(stop_step),
        schedule_end(schedule_end_step),
        speak(speak_),
        progress(first, stop_step, speak_ && isatty(STDERR_FILENO), every) {}
  int64_t stop, schedule_end;  // the step to reach; the curriculum's last step
  bool speak;                  // rank 0, not quiet: progress and messages
  TrainSummary sum;
  MetricsLog log;  // rank 0's
  Progress progress;
  std::string last_ckpt;  // the newest checkpoint written or resumed from
  // The NaN guard's bookkeeping: a checkpoint becomes good once the step after it is finite.
  std::string good_ckpt, unverified_ckpt;
  std::vector<double> rates, recent_losses;  // tokens/s of each step; the last ten LM losses
  std::vector<double> save_stall_s;          // the time each save held training up
  std::chrono::steady_clock::time_point t_start = std::chrono::steady_clock::now();
  std::shared_ptr<CudaEvent> last_copied;  // the last step read: its losses' copy (GPU)
  double elapsed_before = 0;               // the run's time before this leg (earlier legs)

  void say(const std::string& line) {
    if (speak) progress.message(line);
  }
  double leg_seconds() const {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  }
  double elapsed() const { return elapsed_before + leg_seconds(); }
};

// A step queued on the device whose losses the host has not read yet.
struct Trainer::QueuedStep {
  int64_t step = 0;  // its index: it makes state_.step step + 1
  double lr = 0;
  QueuedLosses losses;  // their copy to the host queued behind the step's backward
  std::chrono::steady_clock::time_point t0;  // when the host began queuing it
  double queue_s = 0;  // how long that took, less the waits for the device (queue_wait_s)
  double queue_wait_s = 0;
  bool ahead = false;           // queued before the step before it was read
  parallel::ReducerStats comm;  // the gradient exchange's figures of this step (distributed runs)
  // On a GPU: recorded on the stream where the step's work begins and after its losses' copy.
  std::shared_ptr<CudaEvent> began, copied;
};

// What one training step did, for its metrics.
struct Trainer::StepOutcome {
  StepLosses losses;
  double lr = 0, grad_norm = 0;
  double seconds = 0, tokens = 0;  // wall time; the global batch's tokens
  double queue_s = 0;              // the host's time to queue it (QueuedStep::queue_s)
  double wait_s = 0;               // the host's waits for the device, queuing and reading it
  parallel::ReducerStats comm;     // QueuedStep::comm
  double mfu = -1;                 // model FLOPs over the device's peak (-1: no peak known)
};

namespace {

// SIGTERM, SIGINT and SIGUSR1 set g_signal while a leg runs (the loop stops after the step with a
// checkpoint); the previous handlers come back afterwards.
class SignalsStopTraining {
 public:
  SignalsStopTraining() {
    g_signal.store(0);
    term_ = std::signal(SIGTERM, on_signal);
    int_ = std::signal(SIGINT, on_signal);
    usr1_ = std::signal(SIGUSR1, on_signal);
  }
  ~SignalsStopTraining() {
    std::signal(SIGTERM, term_);
    std::signal(SIGINT, int_);
    std::signal(SIGUSR1, usr1_);
  }
  SignalsStopTraining(const SignalsStopTraining&) = delete;
  SignalsStopTraining& operator=(const SignalsStopTraining&) = delete;

 private:
  void (*term_)(int) = nullptr;
  void (*int_)(int) = nullptr;
  void (*usr1_)(int) = nullptr;
};

std::string signal_name(int sig) {
  return sig == SIGINT    ? "SIGINT"
         : sig == SIGTERM ? "SIGTERM"
         : sig == SIGUSR1 ? "SIGUSR1"
                          : "signal";
}

}  // namespace

Expected<TrainSummary> Trainer::run() {
  HYDRA_ASSIGN_OR_RETURN(std::unique_ptr<Leg> leg, start_leg());
  const Status trained = train_steps(*leg);
  finish_trace(*leg);  // stopped early: the steps so far
  // A checkpoint still being written is published, also after an error: it holds a step that
  // completed, as a save without the background write would have. (A divergence publishes it
  // before its advice names the checkpoints: train_step.)
  const Status published = publish_pending_save(*leg);
  HYDRA_RETURN_IF_ERROR(trained);
  HYDRA_RETURN_IF_ERROR(published);
  return finish_leg(*leg);
}

// Each step is queued on the device, then (train.overlap_steps) the next one behind it, and only
// then are the first one's losses read: the host's step boundary (metrics, signals, the next batch)
// overlaps the device's work. A step is not queued ahead across a boundary that evaluates, saves,
// starts a stage or traces (may_queue_after); a signal seen while one is queued stops after it.
Status Trainer::train_steps(Leg& leg) {
  const SignalsStopTraining signals;
  std::optional<QueuedStep> ahead;  // the step queued before the one before it was read
  while (state_.step < leg.stop) {
    const Stage& stage = stage_at(stages_, state_.step);
    if (!ahead) {
      if (stage.index != current_stage_) HYDRA_RETURN_IF_ERROR(begin_stage(stage, leg));
      HYDRA_ASSIGN_OR_RETURN(QueuedStep q, queue_step(stage, state_.step, leg));
      ahead = std::move(q);
    }
    QueuedStep current = std::move(*ahead);
    ahead.reset();
    // A failure to queue the next step (its batch) comes after this step's boundary, as it would
    // without the overlap.
    Status next_queued = ok_status();
    if (may_queue_after(current.step, leg)) {
      Expected<QueuedStep> next = queue_step(stage, current.step + 1, leg);
      if (next.ok()) {
        ahead = std::move(*next);
        ahead->ahead = true;
        ++leg.sum.queued_ahead;
      } else {
        next_queued = next.status();
      }
    }
    HYDRA_ASSIGN_OR_RETURN(StepOutcome step, read_step(current, stage, leg));
    if (state_.step == leg.stop) finish_trace(leg);  // before the last step's evaluation
    // The tensors a checkpoint copies all exist after a first step (the optimizer's moments
    // included): their host buffers are set up meanwhile, not when the first save holds training
    // up.
    if (state_.step == leg.sum.first_step + 1 && cfg_.train().async_save() &&
        cfg_.train().save_every() > 0)
      checkpoints_->prepare_staging(*model_, *optimizer_, *grid_);
    MetricValues values = step_metrics(step, stage, leg);
    const bool last = state_.step == leg.stop;
    const bool evaluated = evaluates_at(state_.step, last);
    HYDRA_CHECK(!(evaluated && ahead)) << "step " << state_.step << " evaluates with a step queued";
    if (evaluated) HYDRA_RETURN_IF_ERROR(evaluate_into(stage, &values, leg));
    log_metrics(step, stage, values, evaluated, leg);
    const int sig = agreed_signal();
    HYDRA_RETURN_IF_ERROR(poll_pending_save(leg));
    if (sig != 0 && ahead) {  // the queued step ends first; its boundary saves and stops
      stop_signal_ = sig;
      HYDRA_RETURN_IF_ERROR(next_queued);
      continue;
    }
    HYDRA_CHECK(!(ahead && save_due(last, sig)))
        << "step " << state_.step << " saves with a step queued";
    HYDRA_ASSIGN_OR_RETURN(const bool saved, maybe_save(last, sig, leg));
    if (sig != 0) {
      stop_on_signal(sig, saved, leg);
      break;
    }
    HYDRA_RETURN_IF_ERROR(next_queued);
  }
  return ok_status();
}

// Whether the boundary after `steps` steps evaluates (train.eval_every, and the leg's last).
bool Trainer::evaluates_at(int64_t steps, bool last) const {
  const int64_t every = cfg_.train().eval_every();
  return (every > 0 && steps % every == 0) || last;
}

// Whether step `step` copies the model's statistics to the host (train.stats_every, and the
// schedule's last step).
bool Trainer::collects_stats(int64_t step, const Leg& leg) const {
  return (step + 1) % cfg_.train().stats_every() == 0 || step + 1 == leg.schedule_end;
}

// Whether step `step + 1` may be queued before step `step` is read: its boundary (state_.step then
// step + 1) neither evaluates, saves, starts a stage, nor is the leg's first or last (the kernel
// profile and the trace start after the first step, the last evaluates), no signal came, and the
// next step does not read statistics from the device as it is queued (its reads would wait for
// this step first, moving that time into this step's).
bool Trainer::may_queue_after(int64_t step, const Leg& leg) const {
  const auto& tr = cfg_.train();
  const int64_t boundary = step + 1;
  if (!tr.overlap_steps() || stop_signal_ != 0 || step == leg.sum.first_step ||
      boundary >= leg.stop || collects_stats(boundary, leg))
    return false;
  if (evaluates_at(boundary, false) || save_due(false, 0, boundary)) return false;
  return stage_at(stages_, boundary).index == stage_at(stages_, step).index;
}

// Opens the metrics, says what the leg will do (resume, steps past the schedule, precision, grid).
Expected<std::unique_ptr<Trainer::Leg>> Trainer::start_leg() {
  const int64_t schedule_end = stages_.back().start + stages_.back().steps;
  const int64_t stop = opt_.stop_step > 0 ? opt_.stop_step : schedule_end;
  if (state_.step >= stop) {
    return failed_precondition("nothing to do: the run is at step " + std::to_string(state_.step) +
                               " and --steps is " + std::to_string(stop) +
                               "; pass a larger --steps");
  }
  auto leg =
      std::make_unique<Leg>(state_.step, stop, schedule_end, !opt_.quiet && lead(),
                            std::max<int64_t>(cfg_.train().log_every(), (stop - state_.step) / 20));
  leg->sum.run_dir = opt_.out_dir;
  leg->sum.first_step = state_.step;
  leg->sum.metrics = (fs::path(opt_.out_dir) / "metrics.jsonl").string();
  leg->last_ckpt = leg->unverified_ckpt = resume_from_;
  leg->elapsed_before = state_.elapsed_s;
  stop_signal_ = 0;
  // Rank 0 writes the metrics and talks; every rank trains.
  Status opened = ok_status();
  if (lead()) {
    auto l = MetricsLog::open(opt_.out_dir, resume_from_.empty() ? -1 : state_.step);
    if (l.ok()) {
      leg->log = std::move(*l);
    } else {
      opened = l.status();
    }
  }
  HYDRA_RETURN_IF_ERROR(agree(opened, *grid_));
  if (restarted_)
    leg->say("no checkpoint of " + opt_.out_dir +
             " was published before it stopped: the run starts again from step 0");
  if (!resume_from_.empty())
    leg->say("resumed from " + resume_from_ + " at step " + std::to_string(state_.step) +
             (abandoned_.empty()
                  ? ""
                  : ": branch " + std::to_string(branch_) + " (the " +
                        std::to_string(abandoned_.size()) + " newer checkpoint(s) moved to " +
                        opt_.out_dir + "/abandoned/branch-" + std::to_string(branch_) + ")"));
  if (stop > schedule_end) {  // --steps past the curriculum's end: say what those steps do
    const Stage& last = stages_.back();
    std::ostringstream os;
    os << "note: --steps " << stop << " goes past the curriculum's end at step " << schedule_end
       << ": steps " << std::max(schedule_end, state_.step) + 1 << "-" << stop
       << " train in the last stage ('" << last.name << "') at its final learning rate "
       << scheduled_lr(last.lr, last.steps - 1, last.steps)
       << " (raise train.steps or the last stage's steps to schedule them)";
    leg->say(os.str());
  }
  if (compute_copies_) {
    std::ostringstream os;
    os.precision(3);
    os << "precision BF16_MIXED: bf16 compute copies of the fp32 parameters ("
       << double(compute_copies_->bytes()) / (1 << 20)
       << " MiB), fp32 gradients, optimizer state and checkpoints";
    leg->say(os.str());
  }
  if (grid_->distributed()) leg->say(grid_banner());
  if (const std::string w = placement_warning(); !w.empty()) leg->say(w);
  return leg;
}

std::string Trainer::grid_banner() const {
  std::ostringstream os;
  os.precision(3);
  const bool gpu = device_.is_cuda(),
             staged = cfg_.parallel().comm() == config::ParallelConfig::MPI;
  const std::string over = !gpu     ? "MPI"
                           : staged ? "MPI, GPU tensors staged through host memory"
                                    : "NCCL " + parallel::nccl_version() + ", one GPU per rank";
  os << "grid " << grid_->shape().str() << " (" << grid_->world().size() << " ranks over " << over
     << "): " << reducer_->num_buckets()
     << (reducer_->num_buckets() == 1 ? " gradient bucket of " : " gradient buckets of ")
     << cfg_.parallel().bucket_mb()
     << " MB; AdamW state on rank 0: " << double(optimizer_->state_bytes()) / (1 << 20) << " MiB"
     << (optimizer_->sharded() ? " (ZeRO-1: sharded over the replicas)"
                               : " (replicated; parallel.zero1 shards it)");
  return os.str();
}

// Rank placement: the expert and sequence groups (ep x sp consecutive world ranks, parallel/grid.h)
// exchange activations every layer, so they should sit inside one host and only data parallelism
// cross the network. Said by rank 0 when its own group spans hosts (the launcher placed ranks
// round-robin, or ep * sp does not divide the ranks per host); empty otherwise.
std::string Trainer::placement_warning() const {
  const auto& info = parallel::process_info();
  const int64_t group = grid_->shape().ep * grid_->shape().sp;
  if (!info.distributed || group <= 1) return "";
  const bool consecutive = info.host_last - info.host_first + 1 == info.local_size;
  const int64_t first = info.rank - info.rank % group, last = first + group - 1;
  if (consecutive && first >= info.host_first && last <= info.host_last) return "";
  std::ostringstream os;
  os << "warning: the expert x sequence group of ranks " << first << "-" << last
     << " spans hosts (this host holds " << info.local_size << " ranks"
     << (consecutive ? ", " + std::to_string(info.host_first) + "-" + std::to_string(info.host_last)
                     : " not numbered consecutively")
     << "): its all-to-alls and halos cross the network every layer. Place ranks in blocks "
        "(srun --distribution=block, mpirun --map-by core) and make ep * sp divide the ranks "
        "per host (docs/CLUSTER.md)";
  return os.str();
}

Status Trainer::begin_stage(const Stage& stage, Leg& leg) {
  HYDRA_RETURN_IF_ERROR(enter_stage(stage));
  std::ostringstream os;
  os << "stage " << stage.index + 1 << "/" << stages_.size() << " '" << stage.name << "' from step "
     << state_.step << ": seq " << stage.seq_len << ", batch " << stage.batch << ", paths "
     << paths_str(stage.paths);
  if (!stage.freeze.empty()) {
    os << ", frozen:";
    for (const auto& g : stage.freeze) os << " " << g;
  }
  leg.sum.stage_log.push_back(os.str());
  leg.say(os.str());
  return ok_status();
}

// Queues step `step`: its batch, forward and backward, clipping and the NaN guard's skip (on the
// device), the optimizer, and the copy of its losses to the host. Reads nothing from the device.
Expected<Trainer::QueuedStep> Trainer::queue_step(const Stage& stage, int64_t step, Leg& leg) {
  const auto& tr = cfg_.train();
  QueuedStep q;
  q.step = step;
  q.t0 = std::chrono::steady_clock::now();
  const double waited0 = host_copy_wait_seconds();
  const int64_t in_stage = step - stage.start;
  if (kernels::device_trace_active())
    kernels::device_trace_mark("step " + std::to_string(step + 1), current_stream(device_));
  // Tests: a signal that arrives while this step is queued (HYDRA_TEST_SIGNAL_AT_STEP, 1-based).
  if (const char* at = std::getenv("HYDRA_TEST_SIGNAL_AT_STEP"); at && std::atoll(at) == step + 1)
    std::raise(SIGUSR1);
  if (device_.is_cuda()) {
    q.began = std::make_shared<CudaEvent>();
    q.began->record(current_stream(device_));
  }
  q.lr = scheduled_lr(stage.lr, std::min(in_stage, stage.steps - 1), stage.steps);
  const double warm =
      stage.aux_warmup > 0 ? std::min(1.0, double(in_stage + 1) / double(stage.aux_warmup)) : 1.0;
  HYDRA_ASSIGN_OR_RETURN(data::Batch loaded, loader_->get(step));
  const data::Batch batch = sequence_shard(std::move(loaded), grid_->sp_rank(), grid_->shape().sp);

  StepSettings ss;
  ss.paths = stage.paths;
  ss.recompute = tr.recompute() == config::TrainConfig::BLOCK;
  ss.aux_scale = stage.aux_scale * warm;
  ss.grad_accum = tr.grad_accum();
  ss.collect_stats = collects_stats(step, leg);
  ss.device = device_;
  {  // bf16 compute copies (BF16_MIXED) during the forward and backward; the fp32 masters for the
     // rest
    const ComputeCopies::Scope compute(compute_copies_.get());
    q.losses = forward_backward_queued(*model_, *grid_, reducer_.get(), batch, ss);
  }
  // The losses and the gradient norm are copied to the host behind the backward, before the
  // update is queued: the read (read_step) waits for the step alone. Clipping and the NaN guard's
  // skip happen on the device (AdamW::step): a step that is not finite changed no parameter.
  q.losses.grad_sum_squares = global_grad_sum_squares(*optimizer_, *grid_);
  q.losses.start_read();
  if (device_.is_cuda()) {
    q.copied = std::make_shared<CudaEvent>();
    q.copied->record(current_stream(device_));
  }
  optimizer_->step(q.lr, tr.lr().lr() > 0 ? stage.lr.lr() : q.lr, q.losses.grad_sum_squares,
                   tr.optimizer().grad_clip());
  model_->zero_grad();
  model_->after_step();  // (a step that is not finite stops the run in read_step)
  if (compute_copies_) compute_copies_->refresh();  // the next step's bf16 copies, queued now
  if (reducer_) q.comm = reducer_->stats();         // this step's, before the next one is queued
  q.queue_wait_s = host_copy_wait_seconds() - waited0;
  q.queue_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - q.t0).count() -
              q.queue_wait_s;
  return q;
}

// Reads a queued step's losses (waiting for its backward), stops on one that is not finite, and
// moves the run to the step after it.
Expected<Trainer::StepOutcome> Trainer::read_step(const QueuedStep& q, const Stage& stage,
                                                  Leg& leg) {
  const auto t_read = std::chrono::steady_clock::now();
  const double waited0 = host_copy_wait_seconds();
  const int64_t step = q.step;
  StepOutcome out;
  out.lr = q.lr;
  out.queue_s = q.queue_s;
  out.comm = q.comm;
  out.losses = q.losses.read(*grid_);
  out.wait_s = q.queue_wait_s + host_copy_wait_seconds() - waited0;
  out.grad_norm = out.losses.grad_norm;
  const double lm_loss = out.losses.lm, total_loss = out.losses.total;
  if (!std::isfinite(total_loss) || !std::isfinite(lm_loss)) {
    leg.progress.finish();
    HYDRA_RETURN_IF_ERROR(publish_pending_save(leg));  // so that the advice can name it
    return internal_error("step " + std::to_string(step + 1) + ": the loss is " +
                          std::to_string(total_loss) + " (not finite); stopping without saving. " +
                          diverged_advice(leg.good_ckpt, leg.unverified_ckpt));
  }
  if (!std::isfinite(out.grad_norm)) {
    leg.progress.finish();
    HYDRA_RETURN_IF_ERROR(publish_pending_save(leg));
    return internal_error("step " + std::to_string(step + 1) +
                          ": the gradient norm is not finite; stopping without saving. " +
                          diverged_advice(leg.good_ckpt, leg.unverified_ckpt));
  }
  if (!leg.unverified_ckpt.empty()) {  // its next step (this one) is finite: it is good
    leg.good_ckpt = leg.unverified_ckpt;
    leg.unverified_ckpt.clear();
  }

  // The step's time. On a GPU, from the device's clock: a step queued ahead takes the time from
  // the step before's losses' copy to its own (the device's period, its idle time included); any
  // other step the time from its first queued work to its losses' copy. (The host's clock would
  // split a run of steps queued ahead unevenly: the host reads a step while the device is well into
  // the next.) On the CPU, where queuing is computing: its queuing and its read.
  if (q.copied) {
    q.copied->synchronize();  // recorded right after the copy just waited for
    const CudaEvent& from = q.ahead && leg.last_copied ? *leg.last_copied : *q.began;
    out.seconds = double(q.copied->ms_since(from)) * 1e-3;
    leg.last_copied = q.copied;
  } else {
    out.seconds = q.queue_s + q.queue_wait_s +
                  std::chrono::duration<double>(std::chrono::steady_clock::now() - t_read).count();
  }
  // The kernel profile covers the steps after the first (whose one-time costs would blur it).
  if (kernel_profile_enabled() && step == leg.sum.first_step && step + 1 < leg.stop)
    kernel_profile_reset();
  if (step == leg.sum.first_step && step + 1 < leg.stop) start_trace(leg);
  out.tokens = double(stage.batch * stage.seq_len);  // the global batch
  state_.tokens_seen += out.tokens;
  state_.step = step + 1;
  leg.rates.push_back(out.tokens / out.seconds);
  if (leg.sum.first_step == step) leg.sum.first_loss = lm_loss;
  leg.recent_losses.push_back(lm_loss);
  if (leg.recent_losses.size() > 10) leg.recent_losses.erase(leg.recent_losses.begin());
  return out;
}

// HYDRA_TRACE (kernels/device_trace.h): the device's activities from the step after the first.
void Trainer::start_trace(Leg& leg) {
  if (kernels::device_trace_path().empty()) return;
  std::string why = "HYDRA_TRACE traces a GPU; this run trains on the CPU";
  const std::string file = kernels::device_trace_file(kernels::device_trace_path(),
                                                      grid_->world().rank(), grid_->world().size());
  if (!device_.is_cuda() || !kernels::device_trace_start(file, &why))
    leg.say("warning: " + why + ": no device trace");
}

void Trainer::finish_trace(Leg& leg) {
  if (!kernels::device_trace_active()) return;
#if HYDRA_WITH_CUDA
  kernels::cuda::device_synchronize(static_cast<int>(device_.index));
#endif
  kernels::device_trace_mark("end of step " + std::to_string(state_.step), current_stream(device_));
  leg.sum.trace = kernels::device_trace_stop();
}

double Trainer::peak_tflops() const {
  const double peak = cfg_.train().peak_tflops();
  return peak > 0 ? peak : device_.is_cuda() ? kDefaultCudaPeakTflops : 0.0;
}

// The step's line of metrics.jsonl (every rank takes part: the model's statistics are averaged
// over the ranks); also warns of MoE layers that route nothing.
MetricValues Trainer::step_metrics(StepOutcome& step, const Stage& stage, Leg& leg) {
  // Model FLOPs per second over the device's peak, per rank (the step's tokens are the global
  // batch's).
  const double tokens_per_s = step.tokens / step.seconds;
  auto flops = flops_per_token_.find(stage.index);  // counted once a stage (~0.2 ms of host time)
  if (flops == flops_per_token_.end())
    flops = flops_per_token_
                .emplace(stage.index,
                         model::training_flops_per_token(spec_, stage.paths, stage.seq_len))
                .first;
  const double tflops = tokens_per_s * flops->second / double(grid_->world().size()) / 1e12;
  const model::AuxLosses& aux = step.losses.aux;
  MetricValues values = {{"loss", step.losses.lm},
                         {"loss.total", step.losses.total},
                         {"loss.balance", aux.balance},
                         {"loss.locality", aux.locality},
                         {"loss.sparsity", aux.sparsity},
                         {"lr", step.lr},
                         {"grad_norm", step.grad_norm},
                         {"tokens_per_s", tokens_per_s},
                         {"step_ms", step.seconds * 1e3},
                         {"host_queue_ms", step.queue_s * 1e3},
                         {"host_wait_ms", step.wait_s * 1e3},
                         {"model_tflops", tflops},
                         {"tokens_seen", state_.tokens_seen},
                         {"elapsed_s", leg.elapsed()},
                         {"stage_index", double(stage.index)},
                         {"branch", double(branch_)},
                         {"memory.rss_peak_mb", peak_rss_mb()},
                         {"memory.optimizer_mb", double(optimizer_->state_bytes()) / (1 << 20)}};
  if (peak_tflops() > 0) {
    step.mfu = tflops / peak_tflops();
    values.push_back({"mfu", step.mfu});
  }
  if (reducer_) {  // rank 0's view of the gradient exchange
    values.push_back({"comm.exposed_ms", step.comm.exposed_ms});
    values.push_back({"comm.buckets_overlapped", double(step.comm.early)});
    if (reducer_->sharding()) values.push_back({"comm.param_gather_ms", step.comm.gather_ms});
  }
  if (device_.is_cuda()) {
    const CudaMemoryStats ms = cuda_memory_stats(device_.index);
    values.push_back({"memory.cuda_peak_mb", double(ms.peak_allocated) / (1 << 20)});
    values.push_back({"memory.cuda_reserved_mb", double(ms.reserved) / (1 << 20)});
  }
  std::map<std::string, double>& stats = step.losses.stats;
  average_over_ranks(stats, *grid_);
  for (const auto& [k, v] : stats)
    if (k.rfind("loss.", 0) != 0) values.push_back({k, v});
  warn_dead_layers(stats, leg);
  return values;
}

// Routing health: a MoE layer whose chunks reach no expert at all has dead experts (its FFN adds
// nothing); said once per layer, the layer named.
void Trainer::warn_dead_layers(const std::map<std::string, double>& stats, Leg& leg) {
  const std::string suffix = ".empty_chunk_frac";
  for (const auto& [k, v] : stats) {
    if (k.rfind("moe.", 0) != 0 || k.size() <= suffix.size() ||
        k.compare(k.size() - suffix.size(), suffix.size(), suffix) != 0 || v < 0.999)
      continue;
    const std::string layer = k.substr(4, k.size() - 4 - suffix.size());
    if (!dead_layers_warned_.insert(layer).second) continue;
    leg.say("warning: step " + std::to_string(state_.step) + ": MoE layer " + layer +
            " routes no chunk to any expert (every router output is zero after the ReLU): its "
            "experts are dead and its FFN adds nothing (metrics moe." +
            layer + ".dead_experts, .empty_chunk_frac)");
  }
}

Status Trainer::evaluate_into(const Stage& stage, MetricValues* values, Leg& leg) {
  HYDRA_ASSIGN_OR_RETURN(leg.sum.eval, evaluate(stage));
  const EvalResult& e = leg.sum.eval;
  leg.sum.eval.step = state_.step;
  values->push_back({"eval.loss", e.loss});
  values->push_back({"eval.perplexity", e.perplexity});
  if (std::isfinite(e.bits_per_byte)) values->push_back({"eval.bits_per_byte", e.bits_per_byte});
  for (int k = 0; k < data::kNumTasks; ++k) {
    if (e.answers[k] == 0) continue;
    const std::string key = std::string("eval.accuracy.") + data::task_name(k);
    values->push_back({key, e.accuracy[k]});
    for (int l = 0; l < data::kNumLevels; ++l)
      if (e.level_answers[k][l] > 0)
        values->push_back({key + "." + data::level_name(k, l), e.level_accuracy[k][l]});
  }
  if (std::isfinite(e.routing_purity)) values->push_back({"eval.routing_purity", e.routing_purity});
  return ok_status();
}

// The step's metrics line (rank 0), the progress bar, and the evaluation's line when one ran.
void Trainer::log_metrics(const StepOutcome& step, const Stage& stage, const MetricValues& values,
                          bool evaluated, Leg& leg) {
  if (lead()) leg.log.write(state_.step, stage.name, values);
  if (!leg.speak) return;
  const double tokens_per_s = step.tokens / step.seconds;
  leg.progress.update(state_.step, stage.name, step.losses.lm, step.lr, tokens_per_s, leg.elapsed(),
                      step.mfu);
  if (!evaluated) return;
  const EvalResult& e = leg.sum.eval;
  std::ostringstream os;
  os.precision(4);
  os << "eval at step " << state_.step << ": loss " << e.loss << ", perplexity " << e.perplexity;
  for (int k = 0; k < data::kNumTasks; ++k)
    if (e.answers[k] > 0) os << ", " << data::task_name(k) << " " << e.accuracy[k];
  leg.say(os.str());
}

// A signal reaches the ranks at different moments: they act on it at the same step.
int Trainer::agreed_signal() const {
  int sig = g_signal.load();
  if (grid_->distributed())
    sig = static_cast<int>(grid_->world().all_reduce_host(double(sig), parallel::ReduceOp::kMax));
  return sig;
}

// Whether the boundary after `step` steps (-1: state_.step) saves: when train.save_every says so,
// at the leg's last step, or on a signal; save_every -1 (benchmarks): never.
bool Trainer::save_due(bool last, int sig, int64_t step) const {
  const int64_t every = cfg_.train().save_every();
  if (step < 0) step = state_.step;
  return every >= 0 && ((every > 0 && step % every == 0) || last || sig != 0);
}

// Saves when save_due; returns whether it saved.
Expected<bool> Trainer::maybe_save(bool last, int sig, Leg& leg) {
  if (!save_due(last, sig)) return false;
  // The metrics up to this step are durable before the checkpoint is published: a kill right
  // after the publish (and a resume from it) must not lose the step's line.
  if (lead()) leg.log.flush();
  state_.rng = default_generator().state();
  state_.elapsed_s = leg.elapsed();
  const auto t0 = std::chrono::steady_clock::now();
  HYDRA_ASSIGN_OR_RETURN(const CheckpointManager::Snapshot snap,
                         checkpoints_->begin_save(state_, cfg_, *model_, *optimizer_, *grid_));
  // The leg's last save (and a save on a signal) is published before the leg ends; so is every
  // save without async_save.
  const bool background = cfg_.train().async_save() && !last && sig == 0;
  if (!background) HYDRA_RETURN_IF_ERROR(publish_pending_save(leg));
  const double stall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  leg.save_stall_s.push_back(stall);
  if (background) {
    char line[256];
    int n = std::snprintf(line, sizeof line,
                          "step %ld: saving in the background; training held up %.2f s (%.2f GB "
                          "copied to host memory in %.2f s",
                          long(state_.step), stall, snap.bytes / 1e9, snap.copy_s);
    if (snap.alloc_s + snap.waited_s > 0.05 && n > 0 && n < int(sizeof line))
      n += std::snprintf(line + n, sizeof line - n,
                         ", %.2f s setting up its buffers, %.2f s finishing the previous save",
                         snap.alloc_s, snap.waited_s);
    leg.say(std::string(line) + ")");
  }
  return true;
}

// A background save is published at the first step boundary after every rank's write ended (one
// small all-reduce a step while it runs).
Status Trainer::poll_pending_save(Leg& leg) {
  if (!checkpoints_->saving()) return ok_status();
  double written = checkpoints_->written() ? 1 : 0;
  if (grid_->distributed())
    written = grid_->world().all_reduce_host(written, parallel::ReduceOp::kMin);
  return written > 0 ? publish_pending_save(leg) : ok_status();
}

// Waits for this rank's write, then publishes (every rank); the NaN guard's bookkeeping starts from
// the published checkpoint: it is good once the step after its own is finite.
Status Trainer::publish_pending_save(Leg& leg) {
  if (!checkpoints_->saving()) return ok_status();
  HYDRA_ASSIGN_OR_RETURN(leg.last_ckpt, checkpoints_->finish_save(*grid_));
  const int64_t step = CheckpointManager::step_of_dir(leg.last_ckpt);
  if (step < state_.step) {  // a later step has run (and was finite)
    leg.good_ckpt = leg.last_ckpt;
    leg.unverified_ckpt.clear();
  } else {
    leg.unverified_ckpt = leg.last_ckpt;
  }
  return ok_status();
}

void Trainer::stop_on_signal(int sig, bool saved, Leg& leg) {
  leg.progress.finish();
  leg.say("received " + signal_name(sig) + " (" + std::to_string(sig) + ") at step " +
          std::to_string(state_.step) +
          (saved ? ": saved checkpoint " + leg.last_ckpt + "; continue with --resume auto"
                 : ": stopping without a checkpoint (train.save_every = -1)"));
  leg.sum.interrupted = true;
  leg.sum.signal = sig;
}

TrainSummary Trainer::finish_leg(Leg& leg) {
  leg.progress.finish();
  if (lead()) leg.log.flush();
  TrainSummary& sum = leg.sum;
  sum.last_step = state_.step;
  sum.checkpoint = leg.last_ckpt;
  sum.save_stall_s = leg.save_stall_s;
  sum.elapsed_s = leg.elapsed();
  sum.leg_s = leg.leg_seconds();
  double l = 0;
  for (double v : leg.recent_losses) l += v;
  sum.last_loss = leg.recent_losses.empty() ? NAN : l / double(leg.recent_losses.size());
  std::sort(leg.rates.begin(), leg.rates.end());
  sum.tokens_per_s = leg.rates.empty() ? 0 : leg.rates[leg.rates.size() / 2];
  return sum;
}

}  // namespace hydra::trainer
