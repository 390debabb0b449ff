// hydra-params: the parameter table of a config, computed without allocating the model.
#include <cstdio>
#include <iostream>

#include "configs/config_io.h"
#include "launch/cli.h"
#include "model/params.h"

using namespace hydra;
namespace po = cli::po;

namespace {

int run(const cli::Tool& tool, int argc, char** argv) {
  po::options_description opts(
      "hydra-params CONFIG [options]\n\n"
      "Prints the per-component parameter count of the model in CONFIG (a RunConfig .pbtxt, e.g.\n"
      "configs/toy.pbtxt): total, active per token (routed experts count max_active of "
      "num_experts;\n"
      "PKM counts the value rows a token reads), and forward FLOPs per token at a sequence "
      "length.\n"
      "Nothing is allocated, so the 1.6B config is instant.\n\nOptions");
  opts.add_options()("help,h", "show this help")("json", "print JSON instead of a table")(
      "seq-len", po::value<int64_t>(),
      "sequence length for the FLOP count (default: model.max_seq_len)")(
      "set", po::value<std::vector<std::string>>()->composing(),
      "override a field, e.g. --set model.d_model=512");
  po::options_description hidden;
  hidden.add_options()("config", po::value<std::string>(), "config file");
  po::positional_options_description pos;
  pos.add("config", 1);
  po::variables_map vm;
  if (const auto done = tool.parse(argc, argv, opts, &vm, &hidden, &pos)) return *done;
  if (!vm.count("config")) {
    tool.error("name a config file, e.g. hydra-params configs/toy.pbtxt");
    return cli::kUsageError;
  }
  const std::string path = vm["config"].as<std::string>();
  auto cfg = cli::load_config(path, cli::overrides(vm, {}));
  if (!cfg.ok()) {
    tool.error(cfg.status().message());
    return cli::kUserError;
  }
  auto spec = model::make_spec(cfg->model(), path);
  if (!spec.ok()) {
    tool.error(spec.status().message());
    return cli::kUserError;
  }
  const int64_t seq = vm.count("seq-len") ? vm["seq-len"].as<int64_t>() : spec->max_seq_len;
  const model::ParamTable t = model::count_parameters(*spec, seq);
  if (vm.count("json")) {
    std::printf("{\"config\": \"%s\", \"seq_len\": %ld, \"components\": {", path.c_str(),
                long(seq));
    for (std::size_t i = 0; i < t.rows.size(); ++i)
      std::printf("%s\"%s\": {\"total\": %ld, \"active\": %ld}", i ? ", " : "",
                  t.rows[i].component.c_str(), long(t.rows[i].total), long(t.rows[i].active));
    std::printf("}, \"total\": %ld, \"active\": %ld, \"forward_flops_per_token\": %.6g}\n",
                long(t.total), long(t.active), t.forward_flops_per_token);
    return 0;
  }
  std::printf("%s (%s)\n", path.c_str(), spec->transformer ? "transformer" : "hydra");
  std::printf("  %-14s %16s %16s\n", "component", "total", "active/token");
  for (const auto& r : t.rows)
    std::printf("  %-14s %16ld %16ld\n", r.component.c_str(), long(r.total), long(r.active));
  std::printf("  %-14s %16ld %16ld\n", "total", long(t.total), long(t.active));
  std::printf("  (%.2fM total, %.2fM active)\n", t.total / 1e6, t.active / 1e6);
  std::printf("  forward FLOPs per token at seq %ld: %.3g (%.2f GFLOP)\n", long(seq),
              t.forward_flops_per_token, t.forward_flops_per_token / 1e9);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const cli::Tool tool("hydra-params", &argc, &argv);
  return tool.guarded([&] { return run(tool, argc, argv); });
}
