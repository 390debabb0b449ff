// Every scalar number of a run config (walked from hydra.proto) set to -1, 0 and 10^9 on top of the
// tiny config, each run as a user would: `hydra-train` for two steps. Each value is refused with a
// message naming the field (exit 1 or 2), or trains (exit 0), or trains and stops on a divergence
// with its message (exit 3). None crashes, ends in an internal error (exit 4) or hangs. The checks
// before training (tests/trainer/configs_test.cpp) only say that a value is accepted; this says
// that an accepted value also runs.
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "tests/config_fields.h"
#include "tests/run_command.h"

namespace {

namespace fs = std::filesystem;

using Result = hydra::testing::CommandResult;
Result run(const std::string& cmd) { return hydra::testing::run_command(cmd); }

TEST(AcceptedValues, EveryNumericFieldTrainsOrIsRefusedByName) {
  const fs::path root =
      fs::temp_directory_path() / ("hydra_accepted_" + std::to_string(::getpid()));
  fs::remove_all(root);
  fs::create_directories(root);
  struct Case {
    std::string field, short_name, value;
  };
  std::vector<Case> cases;
  for (const auto& [name, f] : hydra::testing::numeric_config_fields())
    for (const char* value : {"-1", "0", "1000000000"}) cases.push_back({name, f->name(), value});
  ASSERT_GT(cases.size(), 240u);

  // Two runs at a time, one CPU thread each; a run past 120 s is killed and counted as a hang.
  std::atomic<std::size_t> next{0};
  std::mutex mu;
  std::map<std::string, int> outcomes;
  std::vector<std::string> failures;
  auto worker = [&] {
    for (std::size_t i = next++; i < cases.size(); i = next++) {
      const Case& c = cases[i];
      const std::string dir = (root / ("case-" + std::to_string(i))).string();
      const Result r = run(
          "HYDRA_NUM_THREADS=1 timeout -s KILL 120 " HYDRA_BIN_DIR
          "/hydra-train --config " HYDRA_SOURCE_DIR "/configs/tiny.pbtxt --out " +
          dir +
          " --quiet --no-print-config --steps 2 --set 'curriculum={}' --set train.seq_len=64"
          " --set train.batch_size=2 --set train.eval_batches=1 --set train.save_every=2 --set " +
          c.field + "=" + c.value);
      std::error_code ec;
      fs::remove_all(dir, ec);
      std::string outcome, failure;
      if (r.code == 0) {
        outcome = "trained";
      } else if ((r.code == 1 || r.code == 2) && r.output.find(c.short_name) != std::string::npos) {
        outcome = "refused by name";
      } else if (r.code == 3 && !r.output.empty()) {
        outcome = "stopped with a message (diverged)";
      } else {
        failure = r.code == 137  ? "hung (killed after 120 s)"
                  : r.code == -1 ? "ended by a signal"
                                 : "exit " + std::to_string(r.code);
      }
      std::lock_guard<std::mutex> lock(mu);
      if (failure.empty()) {
        ++outcomes[outcome];
      } else {
        const std::size_t tail = r.output.size() > 600 ? r.output.size() - 600 : 0;
        failures.push_back(c.field + "=" + c.value + ": " + failure + "\n" + r.output.substr(tail));
      }
    }
  };
  std::thread a(worker), b(worker);
  a.join();
  b.join();
  fs::remove_all(root);
  for (const auto& [outcome, n] : outcomes) std::printf("  %-36s %d\n", outcome.c_str(), n);
  for (const std::string& f : failures) ADD_FAILURE() << f;
  EXPECT_GT(outcomes["trained"], 50);
  EXPECT_GT(outcomes["refused by name"], 50);
}

}  // namespace
