// hydra-train: trains a model from a config, with the curriculum, evaluation, metrics and
// checkpoints.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>

#include "autograd/profiler.h"
#include "configs/config_io.h"
#include "kernels/base/parallel.h"
#include "kernels/device_trace.h"
#include "launch/cli.h"
#include "parallel/runtime.h"
#include "trainer/trainer.h"

using namespace hydra;

namespace {

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
  std::printf("  checkpoint  %s\n", s.checkpoint.empty() ? "none written" : s.checkpoint.c_str());
  if (!s.save_stall_s.empty()) {  // each save's stall, or their median and maximum
    const std::vector<double>& v = s.save_stall_s;
    std::string stalls;
    char buf[64];
    if (v.size() <= 8) {
      for (std::size_t i = 0; i < v.size(); ++i) {
        std::snprintf(buf, sizeof buf, "%s%.2f", i ? ", " : "", v[i]);
        stalls += buf;
      }
    } else {
      std::vector<double> sorted = v;
      std::sort(sorted.begin(), sorted.end());
      std::snprintf(buf, sizeof buf, "median %.2f, max %.2f", sorted[sorted.size() / 2],
                    sorted.back());
      stalls = buf;
    }
    std::printf("  saves       %zu in this leg; training held up (s): %s\n", v.size(),
                stalls.c_str());
  }
  std::printf("  metrics     %s (TensorBoard: %s/tb)\n", s.metrics.c_str(), s.run_dir.c_str());
}

// hydra-train's options, and the --help text above them.
cli::po::options_description options() {
  cli::po::options_description opts(
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
      "the GPU)\nand prints the table after the report. HYDRA_TRACE=FILE.json records what the GPU "
      "ran "
      "in the\nsteps after the first (CUPTI, nothing added to the streams), writes it as a Chrome "
      "trace and\nprints where the GPU sat idle.\n\nOptions");
  opts.add_options()("help,h", "show this help")("config", cli::po::value<std::string>(),
                                                 "the config file (RunConfig text)")(
      "set", cli::po::value<std::vector<std::string>>()->composing(),
      "override a config field, e.g. --set train.lr.lr=3e-4 --set model.moe.max_active=1 "
      "(repeatable)")("out", cli::po::value<std::string>(),
                      "the run directory; refused if it holds another run (unless --resume)")(
      "resume", cli::po::value<std::string>()->implicit_value("auto"),
      "continue: 'auto' (the newest complete checkpoint in --out), or a checkpoint or run "
      "directory")("steps", cli::po::value<int64_t>(),
                   "the step count to reach in total (default train.steps); with --resume, trains "
                   "the remaining steps")(
      "eval-every", cli::po::value<int64_t>(),
      "evaluate every N steps (train.eval_every; 0: only at the end)")(
      "save-every", cli::po::value<int64_t>(),
      "checkpoint every N steps (train.save_every; 0: only at the end; -1: never, for benchmarks)")(
      "stats-every", cli::po::value<int64_t>(),
      "the model's statistics (routing, gates, memories) in the metrics every N steps "
      "(train.stats_every)")("seed", cli::po::value<uint64_t>(),
                             "the seed of initialisation and data (train.seed)")(
      "device", cli::po::value<std::string>(), "cpu or cuda (train.device)")(
      "threads", cli::po::value<int>(),
      "CPU threads per rank (default: HYDRA_NUM_THREADS, OMP_NUM_THREADS, or the host's cores "
      "divided among the ranks on it)")(
      "quiet",
      "no progress output or report (HYDRA_PROFILE's and HYDRA_TRACE's tables are still printed)")(
      "force",
      "with --resume from a checkpoint older than the run's newest: start a new branch from it "
      "(the newer checkpoints and their metrics move to OUT/abandoned/branch-N/; "
      "OUT/lineage.jsonl records each branch)")(
      "no-print-config", "do not print the resolved config (it is still saved in --out)");
  return opts;
}

int run(const cli::Tool& tool, int argc, char** argv) {
  const cli::po::options_description opts = options();
  cli::po::variables_map vm;
  if (const auto done = tool.parse(argc, argv, opts, &vm)) return *done;
  if (!vm.count("config") || !vm.count("out")) {
    tool.error(
        "--config and --out are required, e.g.\n"
        "  hydra-train --config configs/tiny.pbtxt --out runs/tiny");
    return cli::kUsageError;
  }
  for (const char* flag : {"steps", "threads", "eval-every", "save-every", "stats-every"}) {
    if (!vm.count(flag)) continue;
    const int64_t v = std::string(flag) == "threads" ? vm[flag].as<int>() : vm[flag].as<int64_t>();
    const int64_t low = std::string(flag) == "save-every"   ? -1
                        : std::string(flag) == "eval-every" ? 0
                                                            : 1;
    if (v < low) {
      tool.error("--" + std::string(flag) + " " + std::to_string(v) +
                 ": must be >= " + std::to_string(low) + " (see hydra-train --help)");
      return cli::kUsageError;
    }
  }
  const std::string config_path = vm["config"].as<std::string>();
  cli::set_threads(vm);
  auto cfg = cli::load_config(config_path, cli::overrides(vm, {{"eval-every", "train.eval_every"},
                                                               {"save-every", "train.save_every"},
                                                               {"stats-every", "train.stats_every"},
                                                               {"seed", "train.seed"},
                                                               {"device", "train.device"}}));
  if (!cfg.ok()) {
    tool.error(cfg.status().message());
    return cli::kUserError;
  }
  trainer::TrainOptions to;
  to.out_dir = vm["out"].as<std::string>();
  if (vm.count("resume")) to.resume = vm["resume"].as<std::string>();
  if (vm.count("steps")) to.stop_step = vm["steps"].as<int64_t>();
  to.quiet = vm.count("quiet") > 0;
  to.force = vm.count("force") > 0;
  auto t = trainer::Trainer::create(*cfg, config_path, to);
  if (!t.ok()) {
    tool.error(t.status().message());
    return cli::kUserError;
  }
  const bool speak = !to.quiet && tool.lead();
  if (speak && !vm.count("no-print-config"))
    std::cout << "# resolved config (saved as " << to.out_dir << "/config.pbtxt)\n"
              << config::to_text((*t)->config());
  if (speak) {
    std::cout << "# " << num_threads() << " CPU threads per rank, run directory " << to.out_dir;
    const auto& p = (*t)->config().parallel();
    if (parallel::process_info().distributed)
      std::cout << ", " << parallel::process_info().size << " ranks (dp=" << p.dp()
                << " ep=" << p.ep() << " sp=" << p.sp() << ", " << parallel::process_info().launcher
                << ")";
    std::cout << "\n";
  }
  auto summary = (*t)->run();
  if (!summary.ok()) {
    tool.error(summary.status().message());
    return summary.status().code() == StatusCode::kInternal ? cli::kTrainingFailed
                                                            : cli::kUserError;
  }
  if (speak) print_report(*summary);
  // HYDRA_TRACE's summary and HYDRA_PROFILE's table are asked for by name: printed on the lead rank
  // even with --quiet (benchmark scripts run quiet and still want them).
  if (tool.lead() && summary->trace.steps > 0) {
    kernels::print_trace_summary(std::cout, summary->trace);
    std::cout << "  trace of the steps: " << summary->trace.file
              << (parallel::process_info().distributed ? " (each rank writes its own .rank<r> file)"
                                                       : "")
              << " (open it in https://ui.perfetto.dev)\n";
  }
  if (tool.lead() && kernel_profile_enabled())
    kernel_profile_report(std::cout,
                          std::max<int64_t>(0, summary->last_step - summary->first_step - 1));
  // Stopped early by a signal (after its checkpoint): 128 + the signal, as a shell reports it, so
  // that a scheduler does not mark the job completed (130 Ctrl-C, 138 SIGUSR1, 143 SIGTERM).
  return summary->interrupted ? 128 + summary->signal : cli::kOk;
}

}  // namespace

int main(int argc, char** argv) {
  const cli::Tool tool("hydra-train", &argc, &argv);
  return tool.guarded([&] { return run(tool, argc, argv); });
}
