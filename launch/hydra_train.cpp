// hydra-train: trains a model from a config, with the curriculum, evaluation, metrics and
// checkpoints.
#include <algorithm>
#include <boost/program_options.hpp>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iostream>

#include "autograd/profiler.h"
#include "configs/config_io.h"
#include "kernels/base/parallel.h"
#include "parallel/runtime.h"
#include "trainer/trainer.h"

namespace po = boost::program_options;
using namespace hydra;

namespace {

constexpr int kUsageError = 2, kUserError = 1, kTrainingFailed = 3, kInternalError = 4;

void print_report(const trainer::TrainSummary& s) {
  std::printf("\nHydra training report (%s)\n", s.run_dir.c_str());
  std::printf("  steps %ld -> %ld in %s, %.0f tokens/s (median)%s\n", long(s.first_step),
              long(s.last_step), trainer::format_duration(s.leg_s).c_str(), s.tokens_per_s,
              s.interrupted ? " [interrupted]" : "");
  if (s.elapsed_s > s.leg_s + 1)
    std::printf("  the whole run so far (earlier legs included): %s\n",
                trainer::format_duration(s.elapsed_s).c_str());
  std::printf("  LM loss %.4f (first step) -> %.4f (mean of the last 10 steps)\n", s.first_loss,
              s.last_loss);
  if (s.eval.tokens == 0) {
    std::printf(
        "  eval: none in this leg (the run evaluates every train.eval_every steps and at its end; "
        "earlier ones are in metrics.jsonl)\n");
  } else {
    std::printf("  eval at step %ld: loss %.4f, perplexity %.3f over %ld tokens\n",
                long(s.eval.step), s.eval.loss, s.eval.perplexity, long(s.eval.tokens));
  }
  std::fputs(trainer::task_accuracy_table(s.eval).c_str(), stdout);
  if (std::isfinite(s.eval.routing_purity))
    std::printf("  expert routing purity on mixture domains: %.2f\n", s.eval.routing_purity);
  std::printf("  checkpoint  %s\n  metrics     %s (TensorBoard: %s/tb)\n",
              s.checkpoint.empty() ? "none written" : s.checkpoint.c_str(), s.metrics.c_str(),
              s.run_dir.c_str());
}

// Under mpirun every rank runs main(): rank 0 prints, the others stay quiet except about their own
// failures (a rank that learned of another rank's failure does not repeat it).
bool g_lead = true;
int g_rank = 0;

// Errors returned by the trainer are known to every rank (the ranks agree on failures), so rank 0
// alone prints them; a rank that throws prints its own message and takes the job down.
void report_error(const std::string& message) {
  if (g_lead) std::cerr << "hydra-train: " << message << "\n";
}

struct FinalizeMpi {
  ~FinalizeMpi() { parallel::finalize_processes(); }
};

int run_main(int argc, char** argv);

}  // namespace

int main(int argc, char** argv) {
  const auto& info = parallel::init_processes(&argc, &argv);
  g_lead = info.rank == 0;
  g_rank = info.rank;
  FinalizeMpi finalize;
  return run_main(argc, argv);
}

namespace {

int run_main(int argc, char** argv) {
  po::options_description opts(
      "hydra-train --config FILE --out DIR [options]\n\n"
      "Trains the model of a config (configs/*.pbtxt) through its curriculum, writing to DIR:\n"
      "  config.pbtxt   the resolved config (every value in effect)\n"
      "  metrics.jsonl  one JSON line per step (loss, lr, grad norm, tokens/s, expert load, ...)\n"
      "  tb/            TensorBoard event files\n"
      "  checkpoints/   step-NNNNNNNN/ with manifest.pb and rank-00000.h5\n"
      "Without data.shards the model trains on the built-in synthetic tasks.\n\n"
      "Several processes: mpirun -np N hydra-train ... (or srun -n N inside a Slurm allocation), "
      "with\n"
      "parallel { dp ep sp } in the config (or --set parallel.dp=N) multiplying to N. Rank 0 "
      "prints and\n"
      "writes; every rank trains. An error on any rank stops them all. On GPUs (train.device=cuda) "
      "each\n"
      "rank takes the GPU of its local rank and the ranks talk over NCCL; --set parallel.comm=MPI "
      "instead\n"
      "stages GPU tensors through host memory (slow; lets several ranks share a GPU, for "
      "tests).\n\nHYDRA_PROFILE=1 in the environment times every kernel (by family, CUDA events on "
      "the GPU)\nand prints the table after the report.\n\nOptions");
  opts.add_options()("help,h", "show this help")("config", po::value<std::string>(),
                                                 "the config file (RunConfig text)")(
      "set", po::value<std::vector<std::string>>()->composing(),
      "override a config field, e.g. --set train.lr.lr=3e-4 --set model.moe.max_active=1 "
      "(repeatable)")("out", po::value<std::string>(),
                      "the run directory; refused if it holds another run (unless --resume)")(
      "resume", po::value<std::string>()->implicit_value("auto"),
      "continue: 'auto' (the newest complete checkpoint in --out), or a checkpoint or run "
      "directory")("steps", po::value<int64_t>(),
                   "the step count to reach in total (default train.steps); with --resume, trains "
                   "the remaining steps")(
      "eval-every", po::value<int64_t>(),
      "evaluate every N steps (train.eval_every; 0: only at the end)")(
      "save-every", po::value<int64_t>(),
      "checkpoint every N steps (train.save_every; 0: only at the end; -1: never, for benchmarks)")(
      "stats-every", po::value<int64_t>(),
      "the model's statistics (routing, gates, memories) in the metrics every N steps "
      "(train.stats_every)")("seed", po::value<uint64_t>(),
                             "the seed of initialisation and data (train.seed)")(
      "device", po::value<std::string>(), "cpu or cuda (train.device)")(
      "threads", po::value<int>(),
      "CPU threads per rank (default: HYDRA_NUM_THREADS, OMP_NUM_THREADS, or the host's cores "
      "divided among the ranks on it)")("quiet", "no progress output or report")(
      "no-print-config", "do not print the resolved config (it is still saved in --out)");
  po::variables_map vm;
  try {
    po::store(po::parse_command_line(argc, argv, opts), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    if (g_lead) std::cerr << "hydra-train: " << e.what() << " (see hydra-train --help)\n";
    return kUsageError;
  }
  if (vm.count("help")) {
    if (g_lead) std::cout << opts << "\n";
    return 0;
  }
  if (!vm.count("config") || !vm.count("out")) {
    if (g_lead)
      std::cerr << "hydra-train: --config and --out are required, e.g.\n"
                   "  hydra-train --config configs/tiny.pbtxt --out runs/tiny\n";
    return kUsageError;
  }
  for (const char* flag : {"steps", "threads", "eval-every", "save-every", "stats-every"}) {
    if (!vm.count(flag)) continue;
    const int64_t v = std::string(flag) == "threads" ? vm[flag].as<int>() : vm[flag].as<int64_t>();
    const int64_t low = std::string(flag) == "save-every"   ? -1
                        : std::string(flag) == "eval-every" ? 0
                                                            : 1;
    if (v < low) {
      if (g_lead)
        std::cerr << "hydra-train: --" << flag << " " << v << ": must be >= " << low
                  << " (see hydra-train --help)\n";
      return kUsageError;
    }
  }
  const std::string config_path = vm["config"].as<std::string>();
  try {
    if (vm.count("threads")) {
      set_num_threads(vm["threads"].as<int>());
    } else if (std::getenv("HYDRA_NUM_THREADS") == nullptr &&
               std::getenv("OMP_NUM_THREADS") == nullptr &&
               parallel::process_info().local_size > 1) {
      // Ranks on one host share its cores: each takes its share, not all of them (4 ranks on 2
      // cores each starting 2 threads ran 8 threads on 2 cores).
      set_num_threads(std::max(1, num_threads() / parallel::process_info().local_size));
    }
    auto cfg = config::load_run_config(config_path);
    if (!cfg.ok()) {
      report_error(cfg.status().message());
      return kUserError;
    }
    std::vector<std::string> sets;
    if (vm.count("set")) sets = vm["set"].as<std::vector<std::string>>();
    if (vm.count("eval-every"))
      sets.push_back("train.eval_every=" + std::to_string(vm["eval-every"].as<int64_t>()));
    if (vm.count("save-every"))
      sets.push_back("train.save_every=" + std::to_string(vm["save-every"].as<int64_t>()));
    if (vm.count("stats-every"))
      sets.push_back("train.stats_every=" + std::to_string(vm["stats-every"].as<int64_t>()));
    if (vm.count("seed")) sets.push_back("train.seed=" + std::to_string(vm["seed"].as<uint64_t>()));
    if (vm.count("device")) sets.push_back("train.device=" + vm["device"].as<std::string>());
    if (const Status st = config::apply_overrides(&*cfg, sets); !st.ok()) {
      report_error(st.message());
      return kUserError;
    }
    trainer::TrainOptions to;
    to.out_dir = vm["out"].as<std::string>();
    if (vm.count("resume")) to.resume = vm["resume"].as<std::string>();
    if (vm.count("steps")) to.stop_step = vm["steps"].as<int64_t>();
    to.quiet = vm.count("quiet") > 0;
    auto t = trainer::Trainer::create(*cfg, config_path, to);
    if (!t.ok()) {
      report_error(t.status().message());
      return kUserError;
    }
    const bool speak = !to.quiet && g_lead;
    if (speak && !vm.count("no-print-config"))
      std::cout << "# resolved config (saved as " << to.out_dir << "/config.pbtxt)\n"
                << config::to_text((*t)->config());
    if (speak) {
      std::cout << "# " << num_threads() << " CPU threads per rank, run directory " << to.out_dir;
      const auto& p = (*t)->config().parallel();
      if (parallel::process_info().distributed)
        std::cout << ", " << parallel::process_info().size << " ranks (dp=" << p.dp()
                  << " ep=" << p.ep() << " sp=" << p.sp() << ", "
                  << parallel::process_info().launcher << ")";
      std::cout << "\n";
    }
    auto summary = (*t)->run();
    if (!summary.ok()) {
      report_error(summary.status().message());
      return summary.status().code() == StatusCode::kInternal ? kTrainingFailed : kUserError;
    }
    if (speak) print_report(*summary);
    if (speak && kernel_profile_enabled())
      kernel_profile_report(std::cout,
                            std::max<int64_t>(0, summary->last_step - summary->first_step - 1));
    // Stopped early by a signal (after its checkpoint): 128 + the signal, as a shell reports it, so
    // that a scheduler does not mark the job completed (130 Ctrl-C, 138 SIGUSR1, 143 SIGTERM).
    return summary->interrupted ? 128 + summary->signal : 0;
  } catch (const Error& e) {
    // Other ranks may be waiting for this one in a collective: take the whole job down.
    if (parallel::process_info().distributed)
      parallel::abort_job(kInternalError, std::string("hydra-train: internal error: ") + e.what());
    std::cerr << "hydra-train: internal error: " << e.what() << "\n";
    return kInternalError;
  } catch (const std::exception& e) {
    if (parallel::process_info().distributed)
      parallel::abort_job(kInternalError, std::string("hydra-train: ") + e.what());
    std::cerr << "hydra-train: " << e.what() << "\n";
    return kInternalError;
  }
}

}  // namespace
