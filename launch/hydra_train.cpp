// hydra-train: trains a model from a config, with the curriculum, evaluation, metrics and checkpoints.
#include <boost/program_options.hpp>

#include <cmath>
#include <cstdio>
#include <iostream>

#include "configs/config_io.h"
#include "kernels/base/parallel.h"
#include "trainer/trainer.h"

namespace po = boost::program_options;
using namespace hydra;

namespace {

constexpr int kUsageError = 2, kUserError = 1, kTrainingFailed = 3, kInternalError = 4;

void print_report(const trainer::TrainSummary& s) {
  std::printf("\nHydra training report (%s)\n", s.run_dir.c_str());
  std::printf("  steps %ld -> %ld in %s, %.0f tokens/s (median)%s\n", long(s.first_step), long(s.last_step),
              trainer::format_duration(s.elapsed_s).c_str(), s.tokens_per_s, s.interrupted ? " [interrupted]" : "");
  std::printf("  LM loss %.4f (first step) -> %.4f (mean of the last 10 steps)\n", s.first_loss, s.last_loss);
  std::printf("  eval: loss %.4f, perplexity %.3f over %ld tokens\n", s.eval.loss, s.eval.perplexity,
              long(s.eval.tokens));
  bool any = false;
  for (int k = 0; k < data::kNumTasks; ++k) {
    if (s.eval.answers[k] == 0) continue;
    if (!any) std::printf("  task accuracy on held-out answers (chance = 1 / distinct answer tokens):\n");
    any = true;
    std::printf("    %-9s %6.1f%%  (chance %4.1f%%, %ld answers)\n", data::task_name(k), 100 * s.eval.accuracy[k],
                100 * s.eval.chance[k], long(s.eval.answers[k]));
  }
  if (std::isfinite(s.eval.routing_purity))
    std::printf("  expert routing purity on mixture domains: %.2f\n", s.eval.routing_purity);
  std::printf("  checkpoint  %s\n  metrics     %s (TensorBoard: %s/tb)\n", s.checkpoint.c_str(), s.metrics.c_str(),
              s.run_dir.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  po::options_description opts(
      "hydra-train --config FILE --out DIR [options]\n\n"
      "Trains the model of a config (configs/*.pbtxt) through its curriculum, writing to DIR:\n"
      "  config.pbtxt   the resolved config (every value in effect)\n"
      "  metrics.jsonl  one JSON line per step (loss, lr, grad norm, tokens/s, expert load, ...)\n"
      "  tb/            TensorBoard event files\n"
      "  checkpoints/   step-NNNNNNNN/ with manifest.pb and rank-00000.h5\n"
      "Without data.shards the model trains on the built-in synthetic tasks.\n\nOptions");
  opts.add_options()("help,h", "show this help")("config", po::value<std::string>(), "the config file (RunConfig text)")(
      "set", po::value<std::vector<std::string>>()->composing(),
      "override a config field, e.g. --set train.lr.lr=3e-4 --set model.moe.max_active=1 (repeatable)")(
      "out", po::value<std::string>(), "the run directory; refused if it holds another run (unless --resume)")(
      "resume", po::value<std::string>()->implicit_value("auto"),
      "continue: 'auto' (the newest complete checkpoint in --out), or a checkpoint or run directory")(
      "steps", po::value<int64_t>(),
      "the step count to reach in total (default train.steps); with --resume, trains the remaining steps")(
      "eval-every", po::value<int64_t>(), "evaluate every N steps (train.eval_every; 0: only at the end)")(
      "save-every", po::value<int64_t>(), "checkpoint every N steps (train.save_every; 0: only at the end)")(
      "seed", po::value<uint64_t>(), "the seed of initialisation and data (train.seed)")(
      "device", po::value<std::string>(), "cpu or cuda (train.device)")(
      "threads", po::value<int>(), "CPU threads (default: HYDRA_NUM_THREADS, OMP_NUM_THREADS, or all cores)")(
      "quiet", "no progress output or report")("no-print-config",
                                                 "do not print the resolved config (it is still saved in --out)");
  po::variables_map vm;
  try {
    po::store(po::parse_command_line(argc, argv, opts), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    std::cerr << "hydra-train: " << e.what() << " (see hydra-train --help)\n";
    return kUsageError;
  }
  if (vm.count("help")) {
    std::cout << opts << "\n";
    return 0;
  }
  if (!vm.count("config") || !vm.count("out")) {
    std::cerr << "hydra-train: --config and --out are required, e.g.\n"
                 "  hydra-train --config configs/tiny.pbtxt --out runs/tiny\n";
    return kUsageError;
  }
  const std::string config_path = vm["config"].as<std::string>();
  try {
    if (vm.count("threads")) set_num_threads(vm["threads"].as<int>());
    auto cfg = config::load_run_config(config_path);
    if (!cfg.ok()) {
      std::cerr << "hydra-train: " << cfg.status().message() << "\n";
      return kUserError;
    }
    std::vector<std::string> sets;
    if (vm.count("set")) sets = vm["set"].as<std::vector<std::string>>();
    if (vm.count("eval-every")) sets.push_back("train.eval_every=" + std::to_string(vm["eval-every"].as<int64_t>()));
    if (vm.count("save-every")) sets.push_back("train.save_every=" + std::to_string(vm["save-every"].as<int64_t>()));
    if (vm.count("seed")) sets.push_back("train.seed=" + std::to_string(vm["seed"].as<uint64_t>()));
    if (vm.count("device")) sets.push_back("train.device=" + vm["device"].as<std::string>());
    for (const std::string& s : sets) {
      const Status st = config::apply_override(&*cfg, s);
      if (!st.ok()) {
        std::cerr << "hydra-train: " << st.message() << "\n";
        return kUserError;
      }
    }
    trainer::TrainOptions to;
    to.out_dir = vm["out"].as<std::string>();
    if (vm.count("resume")) to.resume = vm["resume"].as<std::string>();
    if (vm.count("steps")) to.stop_step = vm["steps"].as<int64_t>();
    to.quiet = vm.count("quiet") > 0;
    auto t = trainer::Trainer::create(*cfg, config_path, to);
    if (!t.ok()) {
      std::cerr << "hydra-train: " << t.status().message() << "\n";
      return kUserError;
    }
    if (!to.quiet && !vm.count("no-print-config"))
      std::cout << "# resolved config (saved as " << to.out_dir << "/config.pbtxt)\n"
                << config::to_text((*t)->config());
    if (!to.quiet) std::cout << "# " << num_threads() << " CPU threads, run directory " << to.out_dir << "\n";
    auto summary = (*t)->run();
    if (!summary.ok()) {
      std::cerr << "hydra-train: " << summary.status().message() << "\n";
      return summary.status().code() == StatusCode::kInternal ? kTrainingFailed : kUserError;
    }
    if (!to.quiet) print_report(*summary);
    return summary->interrupted && summary->signal == 2 ? 130 : 0;
  } catch (const Error& e) {
    std::cerr << "hydra-train: internal error: " << e.what() << "\n";
    return kInternalError;
  } catch (const std::exception& e) {
    std::cerr << "hydra-train: " << e.what() << "\n";
    return kInternalError;
  }
}
