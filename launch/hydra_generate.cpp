// hydra-generate: text from a checkpoint by recurrent decoding (trainer/generation.h): the prompt
// is fed once, then each new token alone, so a token costs the same at any context length (save
// the attention's global keys). Sampling: temperature, top-k, top-p, a seed, stop strings.
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>

#include "autograd/compute_copies.h"
#include "autograd/profiler.h"
#include "configs/config_io.h"
#include "launch/cli.h"
#include "trainer/generation.h"
#include "trainer/trainer.h"

using namespace hydra;
namespace po = cli::po;

namespace {

std::string to_json(const trainer::Generation& g, const std::string& checkpoint, int64_t step,
                    const std::string& stage) {
  std::ostringstream os;
  os.precision(6);
  os << "{\"checkpoint\": " << cli::json_string(checkpoint) << ", \"step\": " << step
     << ", \"stage\": " << cli::json_string(stage) << ", \"prompt_tokens\": " << g.prompt_tokens
     << ", \"prefill_s\": " << g.prefill_s << ", \"decode_s\": " << g.decode_s
     << ", \"decode_steps\": " << g.decode_steps << ", \"decode_tokens_per_s\": "
     << (g.decode_s > 0 ? double(g.decode_steps) / g.decode_s : 0.0) << ", \"samples\": [";
  for (std::size_t i = 0; i < g.text.size(); ++i) {
    os << (i ? ", " : "") << "{\"text\": " << cli::json_string(g.text[i])
       << ", \"tokens\": " << g.tokens[i].size()
       << ", \"ended_by\": " << cli::json_string(g.ended_by[i]) << "}";
  }
  os << "]}";
  return os.str();
}

Expected<std::string> read_prompt(const po::variables_map& vm) {
  if (vm.count("prompt") && vm.count("prompt-file"))
    return invalid_argument("give --prompt or --prompt-file, not both");
  if (vm.count("prompt")) return vm["prompt"].as<std::string>();
  if (!vm.count("prompt-file"))
    return invalid_argument("give a prompt: --prompt TEXT or --prompt-file FILE ('-': stdin)");
  const std::string path = vm["prompt-file"].as<std::string>();
  std::ostringstream text;
  if (path == "-") {
    text << std::cin.rdbuf();
  } else {
    std::ifstream f(path, std::ios::binary);
    if (!f) return not_found("--prompt-file " + path + ": cannot be read");
    text << f.rdbuf();
  }
  return text.str();
}

int run(const cli::Tool& tool, int argc, char** argv) {
  po::options_description opts(
      "hydra-generate CHECKPOINT|RUN_DIR --prompt TEXT [options]\n\n"
      "Continues a prompt with the model of a checkpoint (a checkpoints/step-N directory, or a\n"
      "run directory: its newest complete checkpoint), with the paths its curriculum stage had\n"
      "switched on. Decoding is recurrent: the prompt is read once, then each new token alone,\n"
      "carrying the SSM's state, the attention's keys, the workspace slots and the routing of the\n"
      "chunk in progress; it gives the logits the full forward gives. The text goes to stdout as\n"
      "it is decided; timings (prompt, tokens per second) to stderr. One process.\n\n"
      "Text is tokenized with data.tokenizer, or as bytes for the built-in tasks and byte "
      "shards.\n\n"
      "Examples (after `make demo`):\n"
      "  hydra-generate runs/demo --prompt 'F QGO=' --temperature 0 --max-new-tokens 2\n"
      "  hydra-generate runs/demo --prompt 'F ' --samples 4 --top-k 20 --stop $'\\n'\n\n"
      "Options");
  opts.add_options()("help,h", "show this help")("prompt", po::value<std::string>(),
                                                 "the text to continue")(
      "prompt-file", po::value<std::string>(), "read the prompt from this file ('-': stdin)")(
      "max-new-tokens,n", po::value<int64_t>()->default_value(128),
      "tokens to generate (fewer when a stop string or model.max_seq_len comes first)")(
      "temperature,t", po::value<double>()->default_value(1.0),
      "divides the logits before sampling; 0: always the most likely token (greedy)")(
      "top-k", po::value<int64_t>()->default_value(0),
      "sample among the k likeliest tokens (0: all)")(
      "top-p", po::value<double>()->default_value(1.0),
      "then among the fewest likeliest tokens whose probability reaches p (nucleus sampling)")(
      "seed", po::value<uint64_t>()->default_value(0),
      "the sampling's seed (same seed, same text)")(
      "stop", po::value<std::vector<std::string>>()->composing(),
      "end a sample where its text contains this string, which is not printed (repeatable)")(
      "samples", po::value<int64_t>()->default_value(1),
      "continuations of the prompt, decoded as one batch (each printed under a header)")(
      "config", po::value<std::string>(),
      "the config to build the model from (default: the run directory's config.pbtxt)")(
      "set", po::value<std::vector<std::string>>()->composing(),
      "override a config field, e.g. --set data.tokenizer=bpe.json (repeatable)")(
      "device", po::value<std::string>(), "cpu or cuda (default: the run's train.device)")(
      "threads", po::value<int>(), "CPU threads")(
      "json", po::value<std::string>(),
      "write the samples and timings as JSON to this file ('-': stdout, instead of the text)")(
      "quiet,q", "print only the generated text (no timings)");
  po::options_description hidden;
  hidden.add_options()("checkpoint", po::value<std::string>(), "the checkpoint or run directory");
  po::positional_options_description pos;
  pos.add("checkpoint", 1);
  po::variables_map vm;
  if (const auto done = tool.parse(argc, argv, opts, &vm, &hidden, &pos)) return *done;
  if (!vm.count("checkpoint")) {
    tool.error(
        "name a checkpoint or a run directory, e.g.\n  hydra-generate runs/demo --prompt 'C ab|'");
    return cli::kUsageError;
  }
  auto prompt_text = read_prompt(vm);
  if (!prompt_text.ok()) {
    tool.error(prompt_text.status().message());
    return cli::kUsageError;
  }
  trainer::GenerateOptions go;
  go.max_new_tokens = vm["max-new-tokens"].as<int64_t>();
  go.samples = vm["samples"].as<int64_t>();
  go.sampling.temperature = vm["temperature"].as<double>();
  go.sampling.top_k = vm["top-k"].as<int64_t>();
  go.sampling.top_p = vm["top-p"].as<double>();
  go.sampling.seed = vm["seed"].as<uint64_t>();
  if (vm.count("stop")) go.stop = vm["stop"].as<std::vector<std::string>>();
  if (const Status st = trainer::check_sampling(go.sampling); !st.ok()) {
    tool.error(st.message());
    return cli::kUsageError;
  }
  if (go.max_new_tokens < 1 || go.samples < 1) {
    tool.error("--max-new-tokens and --samples must be >= 1");
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
  // One process: the checkpoint's shards are read whatever layout wrote them.
  std::vector<std::string> sets = cli::overrides(vm, {{"device", "train.device"}});
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
  to.local_only = true;
  auto t = trainer::Trainer::create(*cfg, config_path, to);
  if (!t.ok()) {
    tool.error(t.status().message());
    return cli::kUserError;
  }
  trainer::Trainer& tr = **t;
  auto tokenizer = tr.text_tokenizer();
  if (!tokenizer.ok()) {
    tool.error(tokenizer.status().message());
    return cli::kUserError;
  }
  std::vector<int32_t> prompt = (*tokenizer)->encode(*prompt_text);
  const bool json_stdout = vm.count("json") && vm["json"].as<std::string>() == "-";
  const bool quiet = vm.count("quiet") > 0 || json_stdout;
  const bool stream = !json_stdout && go.samples == 1;
  if (stream) {
    std::fputs(prompt_text->c_str(), stdout);
    std::fflush(stdout);
  }
  const trainer::Stage& stage = tr.checkpoint_stage();
  Expected<trainer::Generation> g = [&] {
    const ComputeCopies::Scope compute(tr.compute_copies());
    return trainer::generate(tr.model(), stage.paths, tr.device(), **tokenizer, prompt, go,
                             [&](const std::string& piece) {
                               if (!stream) return;
                               std::fwrite(piece.data(), 1, piece.size(), stdout);
                               std::fflush(stdout);
                             });
  }();
  if (!g.ok()) {
    if (stream) std::fputs("\n", stdout);
    tool.error(g.status().message());
    return cli::kUserError;
  }
  if (stream) std::fputs("\n", stdout);
  if (!json_stdout && !stream)
    for (std::size_t i = 0; i < g->text.size(); ++i)
      std::printf("--- sample %zu (%s) ---\n%s%s\n", i + 1, g->ended_by[i].c_str(),
                  prompt_text->c_str(), g->text[i].c_str());
  if (!quiet) {
    const double per_s = g->decode_s > 0 ? double(g->decode_steps) / g->decode_s : 0.0;
    std::fprintf(stderr,
                 "hydra-generate: %s (step %ld, stage '%s', %s): a %ld-token prompt in %.3f s, "
                 "then %ld steps in %.3f s: %.1f tokens/s per sample (%.2f ms a step, batch "
                 "%ld)\n",
                 tr.checkpoint().c_str(), long(tr.checkpoint_step()), stage.name.c_str(),
                 tr.device().str().c_str(), long(g->prompt_tokens), g->prefill_s,
                 long(g->decode_steps), g->decode_s, per_s,
                 g->decode_steps > 0 ? 1e3 * g->decode_s / double(g->decode_steps) : 0.0,
                 long(go.samples));
  }
  if (kernel_profile_enabled() && g->decode_steps > 0) {  // HYDRA_PROFILE: the one-token steps
    std::cerr << "kernel profile (HYDRA_PROFILE) of the " << g->decode_steps
              << " one-token steps:\n";
    kernel_profile_report(std::cerr, g->decode_steps);
  }
  if (vm.count("json"))
    return cli::write_json(tool, vm,
                           to_json(*g, tr.checkpoint(), tr.checkpoint_step(), stage.name));
  return cli::kOk;
}

}  // namespace

int main(int argc, char** argv) {
  const cli::Tool tool("hydra-generate", &argc, &argv);
  return tool.guarded([&] { return run(tool, argc, argv); });
}
