// hydra-eval: evaluates a checkpoint without training: held-out loss, perplexity, bits per token
// and per byte (the held-out text's bytes, through the shards' tokenizer), per-task accuracy and
// routing purity, as a table and JSON.
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <sstream>

#include "autograd/compute_copies.h"
#include "configs/config_io.h"
#include "launch/cli.h"
#include "parallel/runtime.h"
#include "trainer/trainer.h"

using namespace hydra;
namespace po = cli::po;

namespace {

// A JSON number, or null for NaN and infinities.
std::string num(double v) {
  if (!std::isfinite(v)) return "null";
  std::ostringstream os;
  os.precision(10);
  os << v;
  return os.str();
}

std::string to_json(const trainer::EvalResult& r, const std::string& checkpoint) {
  const double bits = r.loss / std::log(2.0);
  std::ostringstream os;
  os << "{\"checkpoint\": " << cli::json_string(checkpoint) << ", \"step\": " << r.step
     << ", \"stage\": " << cli::json_string(r.stage) << ", \"tokens\": " << r.tokens
     << ", \"loss\": " << num(r.loss) << ", \"perplexity\": " << num(r.perplexity)
     << ", \"bits_per_token\": " << num(bits)
     << ", \"bits_per_byte\": " << (std::isfinite(r.bits_per_byte) ? num(r.bits_per_byte) : "null")
     << ", \"tasks\": {";
  bool first = true;
  for (int k = 0; k < data::kNumTasks; ++k) {
    if (r.answers[k] == 0) continue;
    os << (first ? "" : ", ") << cli::json_string(data::task_name(k))
       << ": {\"accuracy\": " << num(r.accuracy[k]) << ", \"chance\": " << num(r.chance[k])
       << ", \"answers\": " << r.answers[k] << ", \"levels\": {";
    const char* sep = "";
    for (int l = 0; l < data::kNumLevels; ++l) {
      if (r.level_answers[k][l] == 0) continue;
      os << sep << cli::json_string(data::level_name(k, l))
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

void print_table(const trainer::EvalResult& r, const std::string& checkpoint) {
  std::printf("Hydra evaluation of %s (step %ld, stage '%s')\n", checkpoint.c_str(), long(r.step),
              r.stage.c_str());
  std::printf("  held-out loss %.4f, perplexity %.3f, %.4f bits per token over %ld tokens\n",
              r.loss, r.perplexity, r.loss / std::log(2.0), long(r.tokens));
  if (std::isfinite(r.bits_per_byte))
    std::printf("  %.4f bits per byte of the held-out text\n", r.bits_per_byte);
  else
    std::printf(
        "  bits per byte: unknown (the shards' tokenizer is not bytes: name it with --set "
        "data.tokenizer=FILE)\n");
  std::fputs(trainer::task_accuracy_table(r).c_str(), stdout);
  if (std::isfinite(r.routing_purity))
    std::printf("  expert routing purity on mixture domains: %.2f\n", r.routing_purity);
}

// The mean next-token loss over a text file's tokens (one sequence of up to model.max_seq_len), as
// the checkpoint's stage computes it: what another framework's reader of an export reproduces
// (bench/hydra_torch.py). Any length: the sequence goes through the decoding path in one segment.
int text_loss(const cli::Tool& tool, trainer::Trainer& tr, const std::string& path,
              const po::variables_map& vm) {
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    tool.error("--text " + path + ": cannot be read");
    return cli::kUserError;
  }
  const std::string text{std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
  auto tokenizer = tr.text_tokenizer();
  if (!tokenizer.ok()) {
    tool.error(tokenizer.status().message());
    return cli::kUserError;
  }
  const std::vector<int32_t> ids = (*tokenizer)->encode(text);
  const model::ModelSpec& spec = tr.model().spec();
  const int64_t n = static_cast<int64_t>(ids.size());
  if (n < 2 || n > spec.max_seq_len) {
    tool.error("--text " + path + ": " + std::to_string(n) + " tokens; expected 2 to " +
               std::to_string(spec.max_seq_len) + " (model.max_seq_len)");
    return cli::kUserError;
  }
  for (int32_t t : ids)
    if (t >= spec.vocab) {
      tool.error("--text " + path + ": token " + std::to_string(t) +
                 " is outside the model's vocabulary (is data.tokenizer the model's tokenizer?)");
      return cli::kUserError;
    }
  const trainer::Stage& stage = tr.checkpoint_stage();
  const std::vector<int64_t> all(ids.begin(), ids.end());
  const std::vector<int64_t> inputs(all.begin(), all.end() - 1),
      targets(all.begin() + 1, all.end());
  double loss = 0;
  {
    const ComputeCopies::Scope compute(tr.compute_copies());
    model::DecodeState state(1, n - 1);
    const Tensor logits =
        tr.model().decode(tensor(inputs, {1, n - 1}).to(tr.device()), stage.paths, state);
    loss = cross_entropy(logits.to(DType::kF32), tensor(targets, {1, n - 1}).to(tr.device()))
               .item<double>();
  }
  const double bits_per_byte =
      loss * double(n - 1) / std::log(2.0) /
      double((*tokenizer)->decode(ids).size() - (*tokenizer)->decode({ids[0]}).size());
  if (!tool.lead()) return cli::kOk;
  std::ostringstream json;
  json << "{\"checkpoint\": " << cli::json_string(tr.checkpoint())
       << ", \"step\": " << tr.checkpoint_step() << ", \"stage\": " << cli::json_string(stage.name)
       << ", \"text\": " << cli::json_string(path) << ", \"tokens\": " << n
       << ", \"loss\": " << num(loss) << ", \"bits_per_byte\": " << num(bits_per_byte) << "}";
  const bool json_stdout = vm.count("json") && vm["json"].as<std::string>() == "-";
  if (!json_stdout)
    std::printf(
        "%s (step %ld, stage '%s') on %s: loss %.6f over its %ld next-token targets, %.4f "
        "bits per byte\n",
        tr.checkpoint().c_str(), long(tr.checkpoint_step()), stage.name.c_str(), path.c_str(), loss,
        long(n - 1), bits_per_byte);
  return vm.count("json") ? cli::write_json(tool, vm, json.str()) : cli::kOk;
}

int run(const cli::Tool& tool, int argc, char** argv) {
  po::options_description opts(
      "hydra-eval CHECKPOINT|RUN_DIR [options]\n\n"
      "Evaluates a checkpoint (a checkpoints/step-N directory, or a run directory: its newest\n"
      "complete checkpoint) on held-out data, as training evaluates at that step: the run's\n"
      "config (RUN_DIR/config.pbtxt), the curriculum stage of that step, train.eval_batches\n"
      "batches of the held-out split (built-in tasks, or data.shards). Prints the loss,\n"
      "perplexity, bits per token and per byte (the held-out text's bytes: byte tokens, or\n"
      "shards decoded by data.tokenizer), each task's accuracy and the experts' routing\n"
      "purity; --json writes them as one JSON object. Writes nothing into the\n"
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
      "json", po::value<std::string>(), "also write the result as JSON to this file ('-': stdout)")(
      "text", po::value<std::string>(),
      "instead: the loss on this file's tokens, one sequence of up to model.max_seq_len (what "
      "bench/hydra_torch.py reproduces from an export)");
  po::positional_options_description pos;
  pos.add("checkpoint", 1);
  po::variables_map vm;
  if (const auto done = tool.parse(argc, argv, opts, &vm, nullptr, &pos)) return *done;
  if (!vm.count("checkpoint")) {
    tool.error("name a checkpoint or a run directory, e.g.\n  hydra-eval runs/tiny");
    return cli::kUsageError;
  }
  if (vm.count("batches") && vm["batches"].as<int64_t>() < 1) {
    tool.error("--batches must be >= 1");
    return cli::kUsageError;
  }
  const std::string target = vm["checkpoint"].as<std::string>();
  auto run = cli::resolve_run(target, vm.count("config") ? vm["config"].as<std::string>() : "");
  if (!run.ok()) {
    tool.error(run.status().message());
    return cli::kUserError;
  }
  const std::string config_path = run->config_path;
  cli::set_threads(vm);
  std::vector<std::string> sets =
      cli::overrides(vm, {{"batches", "train.eval_batches"}, {"device", "train.device"}});
  if (vm.count("text"))  // one sequence in one process, whatever layout wrote the checkpoint
    for (const char* f : {"parallel.dp=1", "parallel.ep=1", "parallel.sp=1"}) sets.push_back(f);
  auto cfg = cli::load_config(config_path, sets);
  if (!cfg.ok()) {
    tool.error(cfg.status().message() +
               (vm.count("config") ? "" : " (the run's config; pass --config FILE)"));
    return cli::kUserError;
  }
  trainer::TrainOptions to;
  to.out_dir = run->run_dir;
  to.resume = target;
  to.quiet = true;
  to.evaluate_only = true;
  to.local_only = vm.count("text") > 0;
  auto t = trainer::Trainer::create(*cfg, config_path, to);
  if (!t.ok()) {
    tool.error(t.status().message());
    return cli::kUserError;
  }
  if (vm.count("text")) return text_loss(tool, **t, vm["text"].as<std::string>(), vm);
  auto r = (*t)->evaluate_checkpoint();
  if (!r.ok()) {
    tool.error(r.status().message());
    return cli::kUserError;
  }
  if (!tool.lead()) return cli::kOk;
  const std::string json = to_json(*r, (*t)->checkpoint());
  const bool json_stdout = vm.count("json") && vm["json"].as<std::string>() == "-";
  if (!json_stdout) print_table(*r, (*t)->checkpoint());
  return vm.count("json") ? cli::write_json(tool, vm, json) : cli::kOk;
}

}  // namespace

int main(int argc, char** argv) {
  const cli::Tool tool("hydra-eval", &argc, &argv);
  return tool.guarded([&] { return run(tool, argc, argv); });
}
