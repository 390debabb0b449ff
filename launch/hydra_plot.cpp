// hydra-plot RUN_DIR: draws a run's metrics.jsonl to PNG files in RUN_DIR/plots with gnuplot.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace fs = std::filesystem;

namespace {

// One metrics line: numeric fields by key (strings and nulls skipped).
std::map<std::string, double> parse_line(const std::string& line) {
  std::map<std::string, double> out;
  std::size_t i = 0;
  while ((i = line.find('"', i)) != std::string::npos) {
    const std::size_t j = line.find('"', i + 1);
    if (j == std::string::npos) break;
    const std::string key = line.substr(i + 1, j - i - 1);
    std::size_t k = line.find(':', j);
    if (k == std::string::npos) break;
    ++k;
    while (k < line.size() && line[k] == ' ') ++k;
    if (k < line.size() && line[k] == '"') {  // a string value: skip it
      i = line.find('"', k + 1) + 1;
      continue;
    }
    char* end = nullptr;
    const double v = std::strtod(line.c_str() + k, &end);
    if (end != line.c_str() + k) out[key] = v;
    i = k;
  }
  return out;
}

struct Plot {
  std::string file, title, ylabel;
  std::vector<std::string> prefixes;  // keys starting with any of these
  bool logy = false;
  int dots = -1;  // >= 0: only keys with this many '.' after the prefix (-1: any)
};

// The plots drawn, each from the metrics whose names it lists (or starts with).
std::vector<Plot> plot_list() {
  return {
      {"loss.png", "loss", "nats/token", {"loss", "loss.total", "eval.loss"}, true},
      {"aux_losses.png",
       "MoE auxiliary losses (weighted)",
       "loss",
       {"loss.balance", "loss.locality", "loss.sparsity"}},
      {"lr.png", "learning rate and gradient norm", "", {"lr", "grad_norm"}, true},
      {"throughput.png", "throughput", "tokens/s", {"tokens_per_s"}},
      {"sparsity.png", "expert sparsity (TLS, 8-token CLS)", "", {"moe."}},
      {"memory.png", "memories", "", {"workspace.", "pkm."}},
      {"accuracy.png",
       "task accuracy (held-out answers)",
       "accuracy",
       {"eval.accuracy.", "eval.routing_purity"},
       false,
       0},
      {"accuracy_levels.png",
       "task accuracy by difficulty (chaining: proof length k; recall: near / far)",
       "accuracy",
       {"eval.accuracy."},
       false,
       1},
      {"controller.png", "controller mix and LayerScale gate norms", "", {"block."}},
  };
}

// The metrics a plot draws, of those the run logged.
std::vector<std::string> series_of(const Plot& p, const std::set<std::string>& keys) {
  std::vector<std::string> cols;
  for (const std::string& k : keys)
    for (const std::string& pre : p.prefixes) {
      const bool exact = pre.back() != '.';
      if (exact ? k == pre : k.rfind(pre, 0) == 0) {
        if (!exact && p.dots >= 0 &&
            std::count(k.begin() + static_cast<std::ptrdiff_t>(pre.size()), k.end(), '.') != p.dots)
          continue;
        // Per-expert loads would crowd the sparsity plot: keep its TLS and CLS curves.
        if (pre == "moe." && k.find(".tls") == std::string::npos &&
            k.find(".cls8") == std::string::npos)
          continue;
        cols.push_back(k);
        break;
      }
    }
  return cols;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
    std::cerr << "usage: hydra-plot RUN_DIR\n  draws RUN_DIR/metrics.jsonl into "
                 "RUN_DIR/plots/*.png (needs gnuplot)\n";
    return argc == 2 ? 0 : 2;
  }
  const fs::path run = argv[1], metrics = run / "metrics.jsonl", out = run / "plots";
  std::ifstream in(metrics);
  if (!in) {
    std::cerr << "hydra-plot: " << metrics.string() << ": cannot read (is " << run.string()
              << " a run directory?)\n";
    return 1;
  }
  if (std::system("command -v gnuplot > /dev/null 2>&1") != 0) {
    std::cerr << "hydra-plot: gnuplot not found; install it (apt-get install gnuplot-nox)\n";
    return 1;
  }
  std::vector<std::map<std::string, double>> rows;
  std::set<std::string> keys;
  for (std::string line; std::getline(in, line);) {
    auto r = parse_line(line);
    if (!r.count("step")) continue;
    for (const auto& [k, v] : r) keys.insert(k);
    rows.push_back(std::move(r));
  }
  if (rows.empty()) {
    std::cerr << "hydra-plot: " << metrics.string() << " has no metric lines yet\n";
    return 1;
  }
  std::error_code ec;
  fs::create_directories(out / "data", ec);
  const std::vector<Plot> plots = plot_list();
  std::ostringstream script;
  script << "set terminal pngcairo size 1000,600 noenhanced\nset key outside right\nset grid\nset "
            "xlabel 'step'\n";
  // The curriculum's stage boundaries, a dashed grey line each on every plot.
  double last_stage = -1;
  for (const auto& r : rows) {
    const auto it = r.find("stage_index");
    if (it == r.end()) continue;
    if (last_stage >= 0 && it->second != last_stage)
      script << "set arrow from " << r.at("step") << ", graph 0 to " << r.at("step")
             << ", graph 1 nohead dashtype 3 linecolor rgb 'gray50'\n";
    last_stage = it->second;
  }
  int drawn = 0;
  for (const Plot& p : plots) {
    const std::vector<std::string> cols = series_of(p, keys);
    if (cols.empty()) continue;
    // One data file per series holding only its finite points: evaluations come every N steps.
    script << "set output '" << (out / p.file).string() << "'\nset title '" << p.title
           << "'\nset ylabel '" << p.ylabel << "'\n"
           << (p.logy ? "set logscale y\n" : "unset logscale y\n") << "plot ";
    for (std::size_t i = 0; i < cols.size(); ++i) {
      const fs::path dat = out / "data" / (cols[i] + ".dat");
      std::ofstream d(dat);
      int64_t points = 0;
      for (const auto& r : rows) {
        auto it = r.find(cols[i]);
        if (it == r.end() || !std::isfinite(it->second)) continue;
        d << r.at("step") << " " << it->second << "\n";
        ++points;
      }
      // Eight colours, then the same colours dashed: a plot of many series stays readable.
      script << (i ? ", " : "") << "'" << dat.string() << "' using 1:2 with "
             << (points < 30 ? "linespoints" : "lines") << " linecolor " << i % 8 + 1
             << " dashtype " << i / 8 + 1 << " title '" << cols[i] << "'";
    }
    script << "\n";
    ++drawn;
  }
  const fs::path gp = out / "data" / "plots.gp";
  std::ofstream(gp) << script.str();
  if (std::system(
          ("gnuplot '" + gp.string() + "' 2> '" + (out / "data" / "gnuplot.log").string() + "'")
              .c_str()) != 0) {
    std::cerr << "hydra-plot: gnuplot failed; see " << (out / "data" / "gnuplot.log").string()
              << "\n";
    return 1;
  }
  std::printf("hydra-plot: %d plots in %s\n", drawn, out.string().c_str());
  return 0;
}
