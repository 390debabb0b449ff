#include "launch/cli.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <optional>
#include <string>

#include "base/check.h"
#include "kernels/base/parallel.h"
#include "parallel/runtime.h"

namespace hydra::cli {

Tool::Tool(std::string name, int* argc, char*** argv) : name_(std::move(name)) {
  lead_ = parallel::init_processes(argc, argv).rank == 0;
}

Tool::~Tool() { parallel::finalize_processes(); }

void Tool::error(const std::string& message) const {
  if (lead_) std::cerr << name_ << ": " << message << "\n";
}

std::optional<int> Tool::parse(int argc, char** argv, const po::options_description& visible,
                               po::variables_map* vm, const po::options_description* hidden,
                               const po::positional_options_description* positional) const {
  po::options_description all;
  all.add(visible);
  if (hidden != nullptr) all.add(*hidden);
  try {
    po::command_line_parser parser(argc, argv);
    parser.options(all);
    if (positional != nullptr) parser.positional(*positional);
    po::store(parser.run(), *vm);
    po::notify(*vm);
  } catch (const po::error& e) {
    error(std::string(e.what()) + " (see " + name_ + " --help)");
    return kUsageError;
  }
  if (vm->count("help")) {
    if (lead_) std::cout << visible << "\n";
    return kOk;
  }
  return std::nullopt;
}

int Tool::guarded(const std::function<int()>& body) const {
  std::string message;
  try {
    return body();
  } catch (const Error& e) {
    message = name_ + ": internal error: " + e.what();
  } catch (const std::exception& e) {
    message = name_ + ": " + e.what();
  }
  if (parallel::process_info().distributed) parallel::abort_job(kInternalError, message);
  std::cerr << message << "\n";
  return kInternalError;
}

void set_threads(const po::variables_map& vm) {
  if (vm.count("threads")) {
    set_num_threads(vm["threads"].as<int>());
  } else if (std::getenv("HYDRA_NUM_THREADS") == nullptr &&
             std::getenv("OMP_NUM_THREADS") == nullptr && parallel::process_info().local_size > 1) {
    // Ranks on one host share its cores: each takes its share, not all of them (4 ranks on 2
    // cores each starting 2 threads ran 8 threads on 2 cores).
    set_num_threads(std::max(1, num_threads() / parallel::process_info().local_size));
  }
}

namespace {
// An option's value as the text a --set takes.
std::string value_text(const po::variable_value& v) {
  const boost::any& a = v.value();
  if (const auto* s = boost::any_cast<std::string>(&a)) return *s;
  if (const auto* i = boost::any_cast<int64_t>(&a)) return std::to_string(*i);
  if (const auto* u = boost::any_cast<uint64_t>(&a)) return std::to_string(*u);
  if (const auto* n = boost::any_cast<int>(&a)) return std::to_string(*n);
  if (const auto* d = boost::any_cast<double>(&a)) return std::to_string(*d);
  HYDRA_CHECK(false) << "cli::overrides: an option of a type it does not convert";
  return "";
}
}  // namespace

std::vector<std::string> overrides(const po::variables_map& vm,
                                   const std::vector<std::pair<std::string, std::string>>& flags) {
  std::vector<std::string> sets;
  if (vm.count("set")) sets = vm["set"].as<std::vector<std::string>>();
  for (const auto& [option, field] : flags)
    if (vm.count(option)) sets.push_back(field + "=" + value_text(vm[option]));
  return sets;
}

Expected<RunTarget> resolve_run(const std::string& target, const std::string& config_flag) {
  namespace fs = std::filesystem;
  RunTarget t;
  t.is_checkpoint = fs::exists(fs::path(target) / "manifest.pb");
  // A checkpoint is RUN/checkpoints/step-N: its run directory is two levels up.
  const fs::path run_dir = t.is_checkpoint
                               ? fs::path(target).lexically_normal().parent_path().parent_path()
                               : fs::path(target);
  if (!t.is_checkpoint && !fs::is_directory(run_dir / "checkpoints"))
    return invalid_argument(target +
                            " is neither a checkpoint (no manifest.pb) nor a run directory (no "
                            "checkpoints/); name checkpoints/step-N or the run's --out directory");
  t.run_dir = run_dir.string();
  t.config_path = config_flag.empty() ? (run_dir / "config.pbtxt").string() : config_flag;
  return t;
}

Expected<config::RunConfig> load_config(const std::string& path,
                                        const std::vector<std::string>& sets) {
  HYDRA_ASSIGN_OR_RETURN(config::RunConfig cfg, config::load_run_config(path));
  HYDRA_RETURN_IF_ERROR(config::apply_overrides(&cfg, sets));
  return cfg;
}

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (const char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\t':
        out += "\\t";
        break;
      case '\r':
        out += "\\r";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += c;
        }
    }
  }
  return out + "\"";
}

int write_json(const Tool& tool, const po::variables_map& vm, const std::string& json) {
  const std::string path = vm["json"].as<std::string>();
  if (path == "-") {
    std::cout << json << "\n";
    return kOk;
  }
  std::ofstream f(path);
  f << json << "\n";
  if (f) return kOk;
  tool.error("cannot write " + path);
  return kUserError;
}

}  // namespace hydra::cli
