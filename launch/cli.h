// What the command-line tools share: their exit codes, MPI start-up and shutdown, option parsing
// with --help, the CPU threads of each rank, the config with its --set overrides, and the last
// line of defence that turns an exception into a message and takes a multi-rank job down.
// hydra-train, hydra-eval and hydra-params are built from these; each keeps only its own options
// and output.
#pragma once

#include <boost/program_options.hpp>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "configs/config_io.h"

namespace hydra::cli {

namespace po = boost::program_options;

// Exit codes (docs/RELIABILITY.md): a stop by a signal exits 128 + the signal.
constexpr int kOk = 0, kUserError = 1, kUsageError = 2, kTrainingFailed = 3, kInternalError = 4;

// A tool run under mpirun (or alone): MPI is started on construction and finalized on
// destruction; rank 0 (lead) prints, the others only their own failures.
class Tool {
 public:
  Tool(std::string name, int* argc, char*** argv);
  ~Tool();
  Tool(const Tool&) = delete;
  Tool& operator=(const Tool&) = delete;

  const std::string& name() const { return name_; }
  bool lead() const { return lead_; }
  // "<tool>: message" on stderr from rank 0 (errors every rank knows of: the ranks agree on them).
  void error(const std::string& message) const;

  // Parses the command line: `visible` is what --help shows, `hidden` options that --help leaves
  // out (positional ones). Returns an exit code when the tool should stop here: 0 after --help,
  // kUsageError (with the reason and a pointer to --help) on a bad command line.
  std::optional<int> parse(int argc, char** argv, const po::options_description& visible,
                           po::variables_map* vm, const po::options_description* hidden = nullptr,
                           const po::positional_options_description* positional = nullptr) const;

  // Runs the tool's body; an exception becomes a message and kInternalError (in a multi-rank job,
  // the whole job is taken down: the other ranks may be waiting in a collective).
  int guarded(const std::function<int()>& body) const;

 private:
  std::string name_;
  bool lead_ = true;
};

// CPU threads per rank: --threads when given (vm "threads"), else HYDRA_NUM_THREADS or
// OMP_NUM_THREADS when set, else the host's cores divided among the ranks on it.
void set_threads(const po::variables_map& vm);

// The --set values (vm "set"), then `flags`: each (option, config field) pair whose option was
// given becomes "field=value" (later ones win, as on the command line).
std::vector<std::string> overrides(const po::variables_map& vm,
                                   const std::vector<std::pair<std::string, std::string>>& flags);

// The config at `path` with `sets` applied; errors name the file and the field.
Expected<config::RunConfig> load_config(const std::string& path,
                                        const std::vector<std::string>& sets);

// What a tool given RUN_DIR or RUN_DIR/checkpoints/step-N reads: the run directory and its config
// (`config_flag` when given, else RUN_DIR/config.pbtxt). An error names the target and says what
// to pass when it is neither.
struct RunTarget {
  std::string run_dir;
  std::string config_path;
  bool is_checkpoint = false;  // the target is one checkpoint, not a run directory
};
Expected<RunTarget> resolve_run(const std::string& target, const std::string& config_flag);

// `s` as a JSON string: quoted, with quotes, backslashes and control characters escaped.
std::string json_string(const std::string& s);

// Writes `json` and a newline to the file the --json option names (vm "json"), or to stdout for
// "-". kOk, or kUserError after saying (on rank 0) that the file cannot be written.
int write_json(const Tool& tool, const po::variables_map& vm, const std::string& json);

}  // namespace hydra::cli
