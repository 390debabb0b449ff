#include "trainer/trainer.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <set>
#include <sstream>

#include "autograd/cuda_context.h"
#include "autograd/grad_mode.h"
#include "autograd/ops.h"
#include "autograd/profiler.h"
#include "configs/config_io.h"
#include "data/tokenizer.h"
#include "kernels/base/scratch.h"
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

// Refuses, before anything is allocated, a model whose fp32 weights alone cannot fit in the memory
// of one rank even in the most sharded layout (weights / ranks): an extra zero in a size gets a
// message naming the sizes instead of an allocation failure. Training needs several times this
// (gradients, AdamW state, activations); those are not guessed here.
namespace {

// `text` of rank `root`, on every rank (host values summed over the ranks: only root's are
// non-zero).
std::string share_text(parallel::Communicator& world, const std::string& text, int root) {
  const bool mine = world.rank() == root;
  const auto n = static_cast<std::size_t>(world.all_reduce_host(mine ? double(text.size()) : 0.0));
  std::vector<double> chars(n, 0.0);
  if (mine)
    for (std::size_t i = 0; i < n; ++i) chars[i] = static_cast<unsigned char>(text[i]);
  world.all_reduce_host(chars);
  std::string out(n, '\0');
  for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<char>(static_cast<int>(chars[i]));
  return out;
}

// Every rank must train the same resolved config: ranks started with different files or --set
// values would otherwise fail later in a collective with a bare MPI_ERR_TRUNCATE, or not at all.
// Compares a hash of the config's text (in 21-bit pieces, exact as doubles); on a difference, finds
// the first line that differs from rank 0's and names it, with both values, on every rank.
Status check_same_config(parallel::Communicator& world, const std::string& text,
                         const std::string& source) {
  if (world.size() == 1) return ok_status();
  uint64_t h = 1469598103934665603ULL;  // FNV-1a
  for (unsigned char c : text) h = (h ^ c) * 1099511628211ULL;
  std::vector<double> lo, hi;
  for (int k = 0; k < 3; ++k) lo.push_back(double((h >> (21 * k)) & ((1u << 21) - 1)));
  hi = lo;
  world.all_reduce_host(lo, parallel::ReduceOp::kMin);
  world.all_reduce_host(hi, parallel::ReduceOp::kMax);
  if (lo == hi) return ok_status();
  auto lines = [](const std::string& s) {
    std::vector<std::string> v;
    std::istringstream in(s);
    for (std::string l; std::getline(in, l);) v.push_back(l);
    return v;
  };
  const std::vector<std::string> ref = lines(share_text(world, text, 0)), own = lines(text);
  std::size_t first = std::max(ref.size(), own.size());
  for (std::size_t i = 0; i < std::max(ref.size(), own.size()); ++i)
    if (i >= ref.size() || i >= own.size() || ref[i] != own[i]) {
      first = i;
      break;
    }
  const double big = 1e18;
  const double line = world.all_reduce_host(
      first < std::max(ref.size(), own.size()) ? double(first) : big, parallel::ReduceOp::kMin);
  const int who = static_cast<int>(world.all_reduce_host(
      double(first) == line ? double(world.rank()) : big, parallel::ReduceOp::kMin));
  const auto at = static_cast<std::size_t>(line);
  const std::string theirs =
      share_text(world, at < own.size() ? own[at] : std::string("(end of config)"), who);
  auto trim = [](std::string s) {
    s.erase(0, s.find_first_not_of(' '));
    return s;
  };
  return invalid_argument(source + ": the ranks' configs differ: rank " + std::to_string(who) +
                          " has '" + trim(theirs) + "' where rank 0 has '" +
                          trim(at < ref.size() ? ref[at] : std::string("(end of config)")) +
                          "' (line " + std::to_string(at + 1) +
                          " of the resolved config); start every rank with the same "
                          "--config and --set values");
}

Status check_model_fits(const config::RunConfig& cfg, const model::ModelSpec& spec,
                        const std::string& source) {
  const auto& p = cfg.parallel();
  const double ranks = double(std::max<int64_t>(1, p.dp() * p.ep() * p.sp()));
  const double params = double(model::count_parameters(spec, spec.max_seq_len).total);
  const double need = params * 4.0 / ranks;
  const bool cuda = cfg.train().device() == "cuda";
  double have = 0;
  if (cuda) {
    if (cuda_available()) have = double(cuda_total_memory(0));
  } else {
    have = double(::sysconf(_SC_PHYS_PAGES)) * double(::sysconf(_SC_PAGE_SIZE));
  }
  if (have <= 0 || need <= have) return ok_status();
  std::ostringstream os;
  os.precision(3);
  os << source << ": the model has " << params / 1e9 << "B parameters: " << need / double(1 << 30)
     << " GiB of fp32 weights per rank over " << ranks << " rank(s), more than the "
     << have / double(1 << 30) << " GiB of " << (cuda ? "GPU" : "host")
     << " memory (model.d_model = " << spec.d << ", num_blocks = " << spec.num_blocks
     << ", vocab_size = " << spec.vocab << "); check the model's sizes";
  return invalid_argument(os.str());
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
  if (!good.empty() && std::filesystem::exists(good + "/manifest.pb"))
    return out + "The last good checkpoint is " + good + ": resume from it with --resume " + good +
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
  HYDRA_RETURN_IF_ERROR(check_model_fits(t->cfg_, t->spec_, source));
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
    HYDRA_RETURN_IF_ERROR(check_same_config(*world, config::to_text(t->cfg_), source));
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
  kernels::set_deterministic(t->cfg_.train().deterministic());
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
      HYDRA_ASSIGN_OR_RETURN(auto tok, data::load_tokenizer(t->cfg_.data().tokenizer()));
      if (tok->id() != src->tokenizer())
        return invalid_argument("data.tokenizer " + t->cfg_.data().tokenizer() + " (" + tok->id() +
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

// Phase 1: the run directory and what to resume from (no writes yet).
Status Trainer::prepare() {
  const std::string& out = opt_.out_dir;
  if (out.empty()) return invalid_argument("--out: name the run directory");
  std::error_code ec;
  checkpoints_ = std::make_unique<CheckpointManager>(out, cfg_.train().keep_last());
  if (opt_.evaluate_only && opt_.resume.empty())
    return invalid_argument("evaluation needs a checkpoint or a run directory to load");
  if (opt_.resume.empty()) {
    for (const char* marker : {"config.pbtxt", "metrics.jsonl", "checkpoints"})
      if (fs::exists(fs::path(out) / marker))
        return already_exists(out + " holds another run (" + marker +
                              " exists); continue it with --resume auto, or choose a new --out");
  } else if (opt_.resume == "auto") {
    auto latest = checkpoints_->latest();
    if (!latest.ok())
      return not_found("--resume auto: " + out +
                       " has no complete checkpoint to resume from (start without --resume)");
    resume_from_ = *latest;
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
  if (!resume_from_.empty()) {
    const Status loaded =
        CheckpointManager::load(resume_from_, cfg_, *model_, *optimizer_, &state_, *grid_);
    if (!loaded.ok() && opt_.resume == "auto") {  // name the next older checkpoint, if there is one
      const int64_t step = std::stoll(fs::path(resume_from_).filename().string().substr(5));
      auto older = checkpoints_->latest(step);
      return Status(
          loaded.code(),
          loaded.message() + (older.ok() ? "; the next older complete checkpoint is " + *older +
                                               ": resume from it with --resume " + *older
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

// Every rank evaluates its part of each held-out batch (its sequences, its sequence shard); the
// counts are then summed over the ranks.
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
  EvalResult r;
  const int64_t E = spec_.num_experts, V = spec_.vocab;
  auto* hydra = dynamic_cast<model::HydraLM*>(model_.get());
  const int64_t blocks = hydra ? static_cast<int64_t>(hydra->blocks->size()) : 0;
  // Summed over ranks at the end: [loss sum, targets, tokens, answers[k], correct[k], domain x
  // block x expert counts, answer-token presence per task x vocab, answers and correct per task x
  // level].
  const int64_t K = data::kNumTasks, NL = data::kNumLevels, n_dom = 3 * blocks * E;
  std::vector<double> acc(3 + 2 * K + n_dom + K * V + 2 * K * NL, 0.0);
  double *answers, *correct, *dom, *seen, *level_answers, *level_correct;
  const auto point = [&] {  // (again after the all-reduce, which replaces the vector)
    answers = acc.data() + 3;
    correct = answers + K;
    dom = correct + K;
    seen = dom + n_dom;
    level_answers = seen + K * V;
    level_correct = level_answers + K * NL;
  };
  point();
  const int64_t batches = cfg_.train().eval_batches();
  for (int64_t i = 0; i < batches; ++i) {
    HYDRA_ASSIGN_OR_RETURN(data::Batch loaded, loader.get(i));
    const data::Batch b = sequence_shard(loaded, grid_->sp_rank(), grid_->shape().sp);
    model::ForwardContext ctx;
    ctx.paths = stage.paths;
    ctx.grid = grid_.get();
    ctx.lm_tokens = 1;  // lm_loss = the sum of this rank's token losses
    ctx.pos0 = grid_->sp_rank() * b.len;
    const Tensor tokens = tensor(b.tokens, {b.batch, b.len}).to(device_);
    const Tensor targets = tensor(b.targets, {b.batch, b.len}).to(device_);
    const ComputeCopies::Scope compute(compute_copies_.get());
    const model::LmOutput out = model_->forward(tokens, targets, ctx, true);
    acc[0] += out.lm_loss.item<double>();
    for (int64_t t : b.targets) acc[1] += t != model::LanguageModel::kIgnoreIndex;
    acc[2] += double(b.batch * b.len);
    const auto [best, idx] = topk(out.logits, 1);
    const std::vector<int64_t> pred = idx.to_vector<int64_t>();
    for (std::size_t t = 0; t < b.answer.size(); ++t) {
      const int task = b.answer[t];
      if (task < 0) continue;
      const bool right = pred[t] == b.targets[t];
      answers[task] += 1;
      correct[task] += right;
      if (const int level = b.level[t]; level >= 0 && level < NL) {
        level_answers[task * NL + level] += 1;
        level_correct[task * NL + level] += right;
      }
      if (b.targets[t] >= 0 && b.targets[t] < V) seen[task * V + b.targets[t]] = 1;
    }
    // Routing purity on the mixture's domains: per domain, the experts its whole chunks used.
    if (hydra && stage.paths.moe_routing) {
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const model::MoeRouting& rt = hydra->blocks->at<model::HydraBlock>(blk).moe->last_routing();
        if (rt.batch != b.batch) continue;
        for (int64_t s = 0; s < rt.batch; ++s)
          for (int64_t c = 0; c < rt.num_chunks; ++c) {
            const int d = b.domain[s * b.len + c * rt.chunk];
            bool pure = d >= 0;
            for (int64_t k = 0; k < rt.chunk && pure; ++k)
              pure = b.domain[s * b.len + c * rt.chunk + k] == d;
            if (!pure) continue;
            for (int64_t e = 0; e < rt.num_experts; ++e)
              dom[(d * blocks + blk) * E + e] +=
                  rt.active[(s * rt.num_chunks + c) * rt.num_experts + e];
          }
      }
    }
  }
  if (grid_->distributed()) {
    grid_->world().all_reduce_host(acc);  // presence travels as a count: > 0 means seen
    point();
  }
  r.loss = acc[1] > 0 ? acc[0] / acc[1] : NAN;
  r.perplexity = std::exp(r.loss);
  r.tokens = static_cast<int64_t>(acc[2]);
  for (int k = 0; k < K; ++k) {
    r.answers[k] = static_cast<int64_t>(answers[k]);
    r.accuracy[k] = answers[k] > 0 ? correct[k] / answers[k] : NAN;
    for (int64_t l = 0; l < NL; ++l) {
      const double n_l = level_answers[k * NL + l];
      r.level_answers[k][l] = static_cast<int64_t>(n_l);
      r.level_accuracy[k][l] = n_l > 0 ? level_correct[k * NL + l] / n_l : NAN;
    }
    int64_t distinct = 0;
    for (int64_t v = 0; v < V; ++v) distinct += seen[k * V + v] > 0;
    r.chance[k] = distinct == 0 ? NAN : 1.0 / double(distinct);
  }
  // Purity: for each block and domain, the most used expert's share of that domain's assignments.
  double purity = 0;
  int64_t n = 0;
  for (int d = 0; d < 3; ++d)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      double total = 0, most = 0;
      for (int64_t e = 0; e < E; ++e) {
        total += dom[(d * blocks + blk) * E + e];
        most = std::max(most, dom[(d * blocks + blk) * E + e]);
      }
      if (total > 0) {
        purity += most / total;
        ++n;
      }
    }
  r.routing_purity = n > 0 ? purity / double(n) : NAN;
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

Expected<EvalResult> Trainer::evaluate_checkpoint() {
  HYDRA_CHECK(opt_.evaluate_only) << "evaluate_checkpoint: create the trainer with evaluate_only";
  // The stage of the step that led to the checkpoint, as training evaluates right after a step.
  const int64_t last = std::max<int64_t>(state_.step - 1, 0);
  const Stage* stage = &stages_.back();
  for (const Stage& s : stages_)
    if (last >= s.start && last < s.start + s.steps) {
      stage = &s;
      break;
    }
  HYDRA_ASSIGN_OR_RETURN(EvalResult r, evaluate(*stage));
  r.step = state_.step;
  r.stage = stage->name;
  return r;
}

Expected<TrainSummary> Trainer::run() {
  const auto& tr = cfg_.train();
  const int64_t schedule_end = stages_.back().start + stages_.back().steps;
  const int64_t stop = opt_.stop_step > 0 ? opt_.stop_step : schedule_end;
  TrainSummary sum;
  sum.run_dir = opt_.out_dir;
  sum.first_step = state_.step;
  if (state_.step >= stop) {
    return failed_precondition("nothing to do: the run is at step " + std::to_string(state_.step) +
                               " and --steps is " + std::to_string(stop) +
                               "; pass a larger --steps");
  }
  // Rank 0 writes the metrics and talks; every rank trains.
  const bool speak = !opt_.quiet && lead();
  MetricsLog log;
  Status opened = ok_status();
  if (lead()) {
    auto l = MetricsLog::open(opt_.out_dir, resume_from_.empty() ? -1 : state_.step);
    if (l.ok()) {
      log = std::move(*l);
    } else {
      opened = l.status();
    }
  }
  HYDRA_RETURN_IF_ERROR(agree(opened, *grid_));
  sum.metrics = (fs::path(opt_.out_dir) / "metrics.jsonl").string();
  const bool tty = speak && isatty(STDERR_FILENO);
  Progress progress(state_.step, stop, tty,
                    std::max<int64_t>(tr.log_every(), (stop - state_.step) / 20));
  auto say = [&](const std::string& line) {
    if (speak) progress.message(line);
  };
  if (!resume_from_.empty())
    say("resumed from " + resume_from_ + " at step " + std::to_string(state_.step));
  if (stop > schedule_end) {  // --steps past the curriculum's end: say what those steps do
    const Stage& last = stages_.back();
    std::ostringstream os;
    os << "note: --steps " << stop << " goes past the curriculum's end at step " << schedule_end
       << ": steps " << std::max(schedule_end, state_.step) + 1 << "-" << stop
       << " train in the last stage ('" << last.name << "') at its final learning rate "
       << scheduled_lr(last.lr, last.steps - 1, last.steps)
       << " (raise train.steps or the last stage's steps to schedule them)";
    say(os.str());
  }
  if (compute_copies_) {
    std::ostringstream os;
    os.precision(3);
    os << "precision BF16_MIXED: bf16 compute copies of the fp32 parameters ("
       << double(compute_copies_->bytes()) / (1 << 20)
       << " MiB), fp32 gradients, optimizer state and checkpoints";
    say(os.str());
  }
  if (grid_->distributed()) {
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
    say(os.str());
  }

  g_signal.store(0);
  auto old_term = std::signal(SIGTERM, on_signal);
  auto old_int = std::signal(SIGINT, on_signal);
  auto old_usr1 = std::signal(SIGUSR1, on_signal);
  struct Restore {
    decltype(old_term) a, b, c;
    ~Restore() {
      std::signal(SIGTERM, a);
      std::signal(SIGINT, b);
      std::signal(SIGUSR1, c);
    }
  } restore{old_term, old_int, old_usr1};

  std::string last_ckpt = resume_from_;
  // The NaN guard's bookkeeping: a checkpoint becomes good once the step after it is finite.
  std::string good_ckpt, unverified_ckpt = resume_from_;
  std::vector<double> rates, recent_losses;
  const auto t_start = std::chrono::steady_clock::now();
  const double elapsed_before = state_.elapsed_s;
  auto elapsed = [&] {
    return elapsed_before +
           std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  };
  auto save = [&]() -> Status {
    state_.rng = default_generator().state();
    state_.elapsed_s = elapsed();
    HYDRA_ASSIGN_OR_RETURN(last_ckpt,
                           checkpoints_->save(state_, cfg_, *model_, *optimizer_, *grid_));
    unverified_ckpt = last_ckpt;
    return ok_status();
  };

  while (state_.step < stop) {
    const int64_t step = state_.step;
    const Stage& stage = stage_at(stages_, step);
    if (stage.index != current_stage_) {
      HYDRA_RETURN_IF_ERROR(enter_stage(stage));
      std::ostringstream os;
      os << "stage " << stage.index + 1 << "/" << stages_.size() << " '" << stage.name
         << "' from step " << step << ": seq " << stage.seq_len << ", batch " << stage.batch
         << ", paths " << paths_str(stage.paths);
      if (!stage.freeze.empty()) {
        os << ", frozen:";
        for (const auto& g : stage.freeze) os << " " << g;
      }
      sum.stage_log.push_back(os.str());
      say(os.str());
    }
    const auto t0 = std::chrono::steady_clock::now();
    const int64_t in_stage = step - stage.start;
    const double lr = scheduled_lr(stage.lr, std::min(in_stage, stage.steps - 1), stage.steps);
    const double warm =
        stage.aux_warmup > 0 ? std::min(1.0, double(in_stage + 1) / double(stage.aux_warmup)) : 1.0;
    HYDRA_ASSIGN_OR_RETURN(data::Batch loaded, loader_->get(step));
    const data::Batch batch = sequence_shard(loaded, grid_->sp_rank(), grid_->shape().sp);

    StepSettings ss;
    ss.paths = stage.paths;
    ss.recompute = tr.recompute() == config::TrainConfig::BLOCK;
    ss.aux_scale = stage.aux_scale * warm;
    ss.grad_accum = tr.grad_accum();
    ss.collect_stats = (step + 1) % tr.stats_every() == 0 || step + 1 == schedule_end;
    ss.device = device_;
    StepLosses step_out;
    {  // bf16 compute copies (BF16_MIXED) during the forward and backward; the fp32 masters for the
       // rest
      const ComputeCopies::Scope compute(compute_copies_.get());
      step_out = forward_backward(*model_, *grid_, reducer_.get(), batch, ss);
    }
    const double lm_loss = step_out.lm, total_loss = step_out.total;
    const std::vector<double>& aux = step_out.aux;
    if (!std::isfinite(total_loss) || !std::isfinite(lm_loss)) {
      progress.finish();
      return internal_error(
          "step " + std::to_string(step + 1) + ": the loss is " + std::to_string(total_loss) +
          " (not finite); stopping without saving. " + diverged_advice(good_ckpt, unverified_ckpt));
    }
    const double norm = global_grad_norm(*optimizer_, *grid_);
    if (!std::isfinite(norm)) {
      progress.finish();
      return internal_error("step " + std::to_string(step + 1) +
                            ": the gradient norm is not finite; stopping without saving. " +
                            diverged_advice(good_ckpt, unverified_ckpt));
    }
    if (!unverified_ckpt.empty()) {  // its next step (this one) is finite: it is good
      good_ckpt = unverified_ckpt;
      unverified_ckpt.clear();
    }
    const double clip = tr.optimizer().grad_clip();
    const double scale = clip > 0 && norm > clip ? clip / (norm + 1e-6) : 1.0;
    optimizer_->step(lr, tr.lr().lr() > 0 ? stage.lr.lr() : lr, scale);
    model_->zero_grad();
    model_->after_step();

    const double step_s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    // The kernel profile covers the steps after the first (whose one-time costs would blur it).
    if (kernel_profile_enabled() && step == sum.first_step && step + 1 < stop)
      kernel_profile_reset();
    const double tokens = double(stage.batch * stage.seq_len);  // the global batch
    state_.tokens_seen += tokens;
    state_.step = step + 1;
    rates.push_back(tokens / step_s);
    if (sum.first_step == step) sum.first_loss = lm_loss;
    recent_losses.push_back(lm_loss);
    if (recent_losses.size() > 10) recent_losses.erase(recent_losses.begin());

    // Model FLOPs per second over the device's peak, per rank (the step's tokens are the global
    // batch's).
    const double tflops = tokens / step_s *
                          model::training_flops_per_token(spec_, stage.paths, stage.seq_len) /
                          double(grid_->world().size()) / 1e12;
    const double peak = tr.peak_tflops() > 0 ? tr.peak_tflops()
                        : device_.is_cuda()  ? kDefaultCudaPeakTflops
                                             : 0.0;
    MetricValues values = {{"loss", lm_loss},
                           {"loss.total", total_loss},
                           {"loss.balance", aux[0]},
                           {"loss.locality", aux[1]},
                           {"loss.sparsity", aux[2]},
                           {"lr", lr},
                           {"grad_norm", norm},
                           {"tokens_per_s", tokens / step_s},
                           {"step_ms", step_s * 1e3},
                           {"model_tflops", tflops},
                           {"tokens_seen", state_.tokens_seen},
                           {"elapsed_s", elapsed()},
                           {"stage_index", double(stage.index)},
                           {"memory.rss_peak_mb", peak_rss_mb()},
                           {"memory.optimizer_mb", double(optimizer_->state_bytes()) / (1 << 20)}};
    if (peak > 0) values.push_back({"mfu", tflops / peak});
    if (reducer_) {  // rank 0's view of the gradient exchange
      values.push_back({"comm.exposed_ms", reducer_->stats().exposed_ms});
      values.push_back({"comm.buckets_overlapped", double(reducer_->stats().early)});
      if (reducer_->sharding())
        values.push_back({"comm.param_gather_ms", reducer_->stats().gather_ms});
    }
    if (device_.is_cuda()) {
      const CudaMemoryStats ms = cuda_memory_stats(device_.index);
      values.push_back({"memory.cuda_peak_mb", double(ms.peak_allocated) / (1 << 20)});
      values.push_back({"memory.cuda_reserved_mb", double(ms.reserved) / (1 << 20)});
    }
    average_over_ranks(step_out.stats, *grid_);
    for (const auto& [k, v] : step_out.stats)
      if (k.rfind("loss.", 0) != 0) values.push_back({k, v});
    // Routing health: a MoE layer whose chunks reach no expert at all has dead experts (its FFN
    // adds nothing); said once per layer, the layer named.
    for (const auto& [k, v] : step_out.stats) {
      const std::string suffix = ".empty_chunk_frac";
      if (k.rfind("moe.", 0) != 0 || k.size() <= suffix.size() ||
          k.compare(k.size() - suffix.size(), suffix.size(), suffix) != 0 || v < 0.999)
        continue;
      const std::string layer = k.substr(4, k.size() - 4 - suffix.size());
      if (!dead_layers_warned_.insert(layer).second) continue;
      say("warning: step " + std::to_string(state_.step) + ": MoE layer " + layer +
          " routes no chunk to any expert (every router output is zero after the ReLU): its "
          "experts are dead "
          "and its FFN adds nothing (metrics moe." +
          layer + ".dead_experts, ." + "empty_chunk_frac)");
    }
    const bool last = state_.step == stop;
    const bool eval_due = (tr.eval_every() > 0 && state_.step % tr.eval_every() == 0) || last;
    if (eval_due) {
      HYDRA_ASSIGN_OR_RETURN(sum.eval, evaluate(stage));
      sum.eval.step = state_.step;
      values.push_back({"eval.loss", sum.eval.loss});
      values.push_back({"eval.perplexity", sum.eval.perplexity});
      for (int k = 0; k < data::kNumTasks; ++k) {
        if (sum.eval.answers[k] == 0) continue;
        const std::string key = std::string("eval.accuracy.") + data::task_name(k);
        values.push_back({key, sum.eval.accuracy[k]});
        for (int l = 0; l < data::kNumLevels; ++l)
          if (sum.eval.level_answers[k][l] > 0)
            values.push_back({key + "." + data::level_name(k, l), sum.eval.level_accuracy[k][l]});
      }
      if (std::isfinite(sum.eval.routing_purity))
        values.push_back({"eval.routing_purity", sum.eval.routing_purity});
    }
    if (lead()) log.write(state_.step, stage.name, values);
    if (speak)
      progress.update(state_.step, stage.name, lm_loss, lr, tokens / step_s, elapsed(),
                      peak > 0 ? tflops / peak : -1);
    if (eval_due && speak) {
      std::ostringstream os;
      os.precision(4);
      os << "eval at step " << state_.step << ": loss " << sum.eval.loss << ", perplexity "
         << sum.eval.perplexity;
      for (int k = 0; k < data::kNumTasks; ++k)
        if (sum.eval.answers[k] > 0)
          os << ", " << data::task_name(k) << " " << sum.eval.accuracy[k];
      say(os.str());
    }
    // A signal reaches the ranks at different moments: they act on it at the same step.
    int sig = g_signal.load();
    if (grid_->distributed())
      sig = static_cast<int>(grid_->world().all_reduce_host(double(sig), parallel::ReduceOp::kMax));
    // save_every -1 (benchmarks): no checkpoint at all, not even at the end or on a signal.
    const bool save_due =
        tr.save_every() >= 0 &&
        ((tr.save_every() > 0 && state_.step % tr.save_every() == 0) || last || sig != 0);
    if (save_due) {
      // The metrics up to this step are durable before the checkpoint is published: a kill right
      // after the publish (and a resume from it) must not lose the step's line.
      if (lead()) log.flush();
      HYDRA_RETURN_IF_ERROR(save());
    }
    if (sig != 0) {
      progress.finish();
      const std::string name = sig == SIGINT    ? "SIGINT"
                               : sig == SIGTERM ? "SIGTERM"
                               : sig == SIGUSR1 ? "SIGUSR1"
                                                : "signal";
      say("received " + name + " (" + std::to_string(sig) + ") at step " +
          std::to_string(state_.step) +
          (save_due ? ": saved checkpoint " + last_ckpt + "; continue with --resume auto"
                    : ": stopping without a checkpoint (train.save_every = -1)"));
      sum.interrupted = true;
      sum.signal = sig;
      break;
    }
  }
  progress.finish();
  if (lead()) log.flush();
  sum.last_step = state_.step;
  sum.checkpoint = last_ckpt;
  sum.elapsed_s = elapsed();
  sum.leg_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  double l = 0;
  for (double v : recent_losses) l += v;
  sum.last_loss = recent_losses.empty() ? NAN : l / double(recent_losses.size());
  std::sort(rates.begin(), rates.end());
  sum.tokens_per_s = rates.empty() ? 0 : rates[rates.size() / 2];
  return sum;
}

}  // namespace hydra::trainer
