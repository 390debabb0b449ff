// What a run reports: one JSON line per step in DIR/metrics.jsonl, TensorBoard event files in
// DIR/tb/ (TFRecord framing, masked CRC32C; readable by TensorBoard), and a progress line with ETA
// on a TTY (plain lines otherwise).
#pragma once

#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include "base/status.h"

namespace hydra::trainer {

using MetricValues = std::vector<std::pair<std::string, double>>;

class TensorBoardWriter {
 public:
  static Expected<TensorBoardWriter> open(const std::string& dir);
  TensorBoardWriter() = default;
  TensorBoardWriter(TensorBoardWriter&&) = default;
  TensorBoardWriter& operator=(TensorBoardWriter&&) = default;
  void scalars(int64_t step, const MetricValues& values);
  void flush() { out_.flush(); }
  const std::string& path() const { return path_; }

 private:
  void record(const std::string& bytes);
  std::ofstream out_;
  std::string path_;
};

class MetricsLog {
 public:
  // resume_step >= 0: keep only the lines with step <= resume_step (a resumed run rewrites what
  // came after its checkpoint); otherwise start a new file.
  static Expected<MetricsLog> open(const std::string& run_dir, int64_t resume_step);
  MetricsLog() = default;
  MetricsLog(MetricsLog&&) = default;
  MetricsLog& operator=(MetricsLog&&) = default;
  // One line: {"step": s, "stage": "...", name: value, ...}; also the TensorBoard scalars.
  void write(int64_t step, const std::string& stage, const MetricValues& values);
  void flush();
  const std::string& path() const { return path_; }

 private:
  std::ofstream out_;
  std::string path_;
  TensorBoardWriter tb_;
};

// Renders "stage 2/5 attention  step 120/400 [#####.....] loss 2.31  1.2k tok/s  ETA 1m23s" in
// place on a TTY, or prints a plain line every `every` steps otherwise.
class Progress {
 public:
  Progress(int64_t first_step, int64_t last_step, bool tty, int64_t every);
  // mfu < 0: not known (no peak for this device), left out of the line.
  void update(int64_t step, const std::string& stage, double loss, double lr, double tokens_per_s,
              double elapsed_s, double mfu = -1);
  void message(const std::string& line);  // a line that does not disturb the bar
  void finish();

 private:
  int64_t first_, last_, every_;
  bool tty_, drawn_ = false;
  std::chrono::steady_clock::time_point start_ =
      std::chrono::steady_clock::now();  // of this process's steps
};

std::string format_duration(double seconds);
std::string json_number(double v);
// The step of a metrics.jsonl line ({"step": N, ...}), or -1 for a line without one.
int64_t metrics_line_step(const std::string& line);

}  // namespace hydra::trainer
