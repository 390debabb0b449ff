// hydra-eval: evaluates a checkpoint without training: held-out loss, perplexity, bits per token
// (and per byte on the built-in byte-level tasks), per-task accuracy and routing purity, as a
// table and JSON.
#include <boost/program_options.hpp>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>

#include "configs/config_io.h"
#include "kernels/base/parallel.h"
#include "parallel/runtime.h"
#include "trainer/trainer.h"

namespace po = boost::program_options;
namespace fs = std::filesystem;
using namespace hydra;

namespace {

constexpr int kUsageError = 2, kUserError = 1, kInternalError = 4;

bool g_lead = true;

struct FinalizeMpi {
  ~FinalizeMpi() { parallel::finalize_processes(); }
};

// A JSON number, or null for NaN and infinities.
std::string num(double v) {
  if (!std::isfinite(v)) return "null";
  std::ostringstream os;
  os.precision(10);
  os << v;
  return os.str();
}

std::string quoted(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out + "\"";
}

std::string to_json(const trainer::EvalResult& r, const std::string& checkpoint, bool byte_level) {
  const double bits = r.loss / std::log(2.0);
  std::ostringstream os;
  os << "{\"checkpoint\": " << quoted(checkpoint) << ", \"step\": " << r.step
     << ", \"stage\": " << quoted(r.stage) << ", \"tokens\": " << r.tokens
     << ", \"loss\": " << num(r.loss) << ", \"perplexity\": " << num(r.perplexity)
     << ", \"bits_per_token\": " << num(bits)
     << ", \"bits_per_byte\": " << (byte_level ? num(bits) : "null") << ", \"tasks\": {";
  bool first = true;
  for (int k = 0; k < data::kNumTasks; ++k) {
    if (r.answers[k] == 0) continue;
    os << (first ? "" : ", ") << quoted(data::task_name(k))
       << ": {\"accuracy\": " << num(r.accuracy[k]) << ", \"chance\": " << num(r.chance[k])
       << ", \"answers\": " << r.answers[k] << ", \"levels\": {";
    const char* sep = "";
    for (int l = 0; l < data::kNumLevels; ++l) {
      if (r.level_answers[k][l] == 0) continue;
      os << sep << quoted(data::level_name(k, l))
         << ": {\"accuracy\": " << num(r.level_accuracy[k][l])
         << ", \"answers\": " << r.level_answers[k][l] << "}";
      sep = ", ";
    }
    os << "}}";
    first = false;
  }
  os << "}, \"routing_purity\": " << num(r.routing_purity) << "}";
  return os.str();
}

void print_table(const trainer::EvalResult& r, const std::string& checkpoint, bool byte_level) {
  std::printf("Hydra evaluation of %s (step %ld, stage '%s')\n", checkpoint.c_str(), long(r.step),
              r.stage.c_str());
  std::printf("  held-out loss %.4f, perplexity %.3f, %.4f bits per token%s over %ld tokens\n",
              r.loss, r.perplexity, r.loss / std::log(2.0),
              byte_level ? " (= bits per byte: byte tokens)" : "", long(r.tokens));
  std::fputs(trainer::task_accuracy_table(r).c_str(), stdout);
  if (std::isfinite(r.routing_purity))
    std::printf("  expert routing purity on mixture domains: %.2f\n", r.routing_purity);
}

int run_main(int argc, char** argv) {
  po::options_description opts(
      "hydra-eval CHECKPOINT|RUN_DIR [options]\n\n"
      "Evaluates a checkpoint (a checkpoints/step-N directory, or a run directory: its newest\n"
      "complete checkpoint) on held-out data, as training evaluates at that step: the run's\n"
      "config (RUN_DIR/config.pbtxt), the curriculum stage of that step, train.eval_batches\n"
      "batches of the held-out split (built-in tasks, or data.shards). Prints the loss,\n"
      "perplexity, bits per token (per byte on the built-in byte-level tasks), each task's\n"
      "accuracy and the"
      "experts' routing purity; --json writes them as one JSON object. Writes nothing into the\n"
      "run. Under mpirun, the run's parallel layout (or --set parallel.*) splits the work.\n\n"
      "Options");
  opts.add_options()("help,h", "show this help")("checkpoint", po::value<std::string>(),
                                                 "the checkpoint or run directory (positional)")(
      "config", po::value<std::string>(),
      "the config to build the model from (default: the run directory's config.pbtxt)")(
      "set", po::value<std::vector<std::string>>()->composing(),
      "override a config field, e.g. --set data.shards=held/*.bin (repeatable)")(
      "batches", po::value<int64_t>(), "held-out batches (train.eval_batches)")(
      "device", po::value<std::string>(), "cpu or cuda (train.device)")("threads", po::value<int>(),
                                                                        "CPU threads per rank")(
      "json", po::value<std::string>(), "also write the result as JSON to this file ('-': stdout)");
  po::positional_options_description pos;
  pos.add("checkpoint", 1);
  po::variables_map vm;
  try {
    po::store(po::command_line_parser(argc, argv).options(opts).positional(pos).run(), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    if (g_lead) std::cerr << "hydra-eval: " << e.what() << " (see hydra-eval --help)\n";
    return kUsageError;
  }
  if (vm.count("help")) {
    if (g_lead) std::cout << opts << "\n";
    return 0;
  }
  if (!vm.count("checkpoint")) {
    if (g_lead)
      std::cerr << "hydra-eval: name a checkpoint or a run directory, e.g.\n"
                   "  hydra-eval runs/tiny\n";
    return kUsageError;
  }
  if (vm.count("batches") && vm["batches"].as<int64_t>() < 1) {
    if (g_lead) std::cerr << "hydra-eval: --batches must be >= 1\n";
    return kUsageError;
  }
  const std::string target = vm["checkpoint"].as<std::string>();
  // The run directory: the target itself, or two levels above a checkpoint
  // (RUN/checkpoints/step-N).
  const bool is_checkpoint = fs::exists(fs::path(target) / "manifest.pb");
  const fs::path run_dir = is_checkpoint
                               ? fs::path(target).lexically_normal().parent_path().parent_path()
                               : fs::path(target);
  if (!is_checkpoint && !fs::is_directory(run_dir / "checkpoints")) {
    if (g_lead)
      std::cerr << "hydra-eval: " << target
                << " is neither a checkpoint (no manifest.pb) nor a run directory (no "
                   "checkpoints/); name checkpoints/step-N or the run's --out directory\n";
    return kUserError;
  }
  const std::string config_path =
      vm.count("config") ? vm["config"].as<std::string>() : (run_dir / "config.pbtxt").string();
  try {
    if (vm.count("threads")) set_num_threads(vm["threads"].as<int>());
    auto cfg = config::load_run_config(config_path);
    if (!cfg.ok()) {
      if (g_lead)
        std::cerr << "hydra-eval: " << cfg.status().message()
                  << (vm.count("config") ? "" : " (the run's config; pass --config FILE)") << "\n";
      return kUserError;
    }
    std::vector<std::string> sets;
    if (vm.count("set")) sets = vm["set"].as<std::vector<std::string>>();
    if (vm.count("batches"))
      sets.push_back("train.eval_batches=" + std::to_string(vm["batches"].as<int64_t>()));
    if (vm.count("device")) sets.push_back("train.device=" + vm["device"].as<std::string>());
    if (const Status st = config::apply_overrides(&*cfg, sets); !st.ok()) {
      if (g_lead) std::cerr << "hydra-eval: " << st.message() << "\n";
      return kUserError;
    }
    trainer::TrainOptions to;
    to.out_dir = run_dir.string();
    to.resume = target;
    to.quiet = true;
    to.evaluate_only = true;
    auto t = trainer::Trainer::create(*cfg, config_path, to);
    if (!t.ok()) {
      if (g_lead) std::cerr << "hydra-eval: " << t.status().message() << "\n";
      return kUserError;
    }
    auto r = (*t)->evaluate_checkpoint();
    if (!r.ok()) {
      if (g_lead) std::cerr << "hydra-eval: " << r.status().message() << "\n";
      return kUserError;
    }
    // Byte tokens: the built-in tasks. (Shards: bits per byte needs their tokenizer's bytes per
    // token, not computed yet; the JSON says null.)
    const bool byte_level = (*t)->config().data().shards().empty();
    if (!g_lead) return 0;
    const std::string json = to_json(*r, (*t)->checkpoint(), byte_level);
    const bool json_stdout = vm.count("json") && vm["json"].as<std::string>() == "-";
    if (!json_stdout) print_table(*r, (*t)->checkpoint(), byte_level);
    if (vm.count("json")) {
      if (json_stdout) {
        std::cout << json << "\n";
      } else {
        std::ofstream f(vm["json"].as<std::string>());
        f << json << "\n";
        if (!f) {
          std::cerr << "hydra-eval: cannot write " << vm["json"].as<std::string>() << "\n";
          return kUserError;
        }
      }
    }
    return 0;
  } catch (const Error& e) {
    if (parallel::process_info().distributed)
      parallel::abort_job(kInternalError, std::string("hydra-eval: internal error: ") + e.what());
    std::cerr << "hydra-eval: internal error: " << e.what() << "\n";
    return kInternalError;
  }
}

}  // namespace

int main(int argc, char** argv) {
  const auto& info = parallel::init_processes(&argc, &argv);
  g_lead = info.rank == 0;
  FinalizeMpi finalize;
  return run_main(argc, argv);
}
