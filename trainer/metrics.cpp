#include "trainer/metrics.h"

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <sstream>

#include "configs/tensorboard.pb.h"
#include "trainer/crc32c.h"

namespace hydra::trainer {

namespace fs = std::filesystem;

std::string json_number(double v) {
  if (!std::isfinite(v)) return "null";
  char buf[40];
  std::snprintf(buf, sizeof buf, "%.9g", v);
  return buf;
}

std::string format_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const long t = std::lround(s);
  char buf[32];
  if (t >= 3600)
    std::snprintf(buf, sizeof buf, "%ldh%02ldm", t / 3600, (t % 3600) / 60);
  else if (t >= 60)
    std::snprintf(buf, sizeof buf, "%ldm%02lds", t / 60, t % 60);
  else
    std::snprintf(buf, sizeof buf, "%lds", t);
  return buf;
}

Expected<TensorBoardWriter> TensorBoardWriter::open(const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  char host[128] = {};
  gethostname(host, sizeof host - 1);
  const auto now = std::chrono::system_clock::now().time_since_epoch();
  const long secs =
      static_cast<long>(std::chrono::duration_cast<std::chrono::seconds>(now).count());
  TensorBoardWriter w;
  // The pid keeps two writers started in the same second apart.
  w.path_ = (fs::path(dir) / ("events.out.tfevents." + std::to_string(secs) + "." + host + "." +
                              std::to_string(getpid())))
                .string();
  w.out_.open(w.path_, std::ios::binary);
  if (!w.out_) return io_error(w.path_ + ": cannot create the TensorBoard event file");
  tensorboard::Event first;
  first.set_wall_time(std::chrono::duration<double>(now).count());
  first.set_file_version("brain.Event:2");
  w.record(first.SerializeAsString());
  return w;
}

void TensorBoardWriter::record(const std::string& bytes) {
  // uint64 length, masked crc of the length, data, masked crc of the data (little-endian).
  const uint64_t len = bytes.size();
  char header[8];
  std::memcpy(header, &len, 8);
  const uint32_t len_crc = masked_crc32c(header, 8),
                 data_crc = masked_crc32c(bytes.data(), bytes.size());
  out_.write(header, 8);
  out_.write(reinterpret_cast<const char*>(&len_crc), 4);
  out_.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out_.write(reinterpret_cast<const char*>(&data_crc), 4);
}

void TensorBoardWriter::scalars(int64_t step, const MetricValues& values) {
  if (!out_.is_open()) return;
  tensorboard::Event e;
  e.set_wall_time(
      std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count());
  e.set_step(step);
  for (const auto& [tag, v] : values) {
    if (!std::isfinite(v)) continue;
    auto* sv = e.mutable_summary()->add_value();
    sv->set_tag(tag);
    sv->set_simple_value(static_cast<float>(v));
  }
  record(e.SerializeAsString());
}

int64_t metrics_line_step(const std::string& line) {
  const auto pos = line.find("\"step\": ");
  return pos == std::string::npos ? -1 : std::atoll(line.c_str() + pos + 8);
}

Expected<MetricsLog> MetricsLog::open(const std::string& run_dir, int64_t resume_step) {
  MetricsLog log;
  log.path_ = (fs::path(run_dir) / "metrics.jsonl").string();
  std::string kept;
  if (resume_step >= 0) {
    std::ifstream in(log.path_);
    std::string line;
    while (std::getline(in, line)) {
      const int64_t step = metrics_line_step(line);
      if (step >= 0 && step <= resume_step) kept += line + "\n";
    }
  }
  log.out_.open(log.path_, std::ios::trunc);
  if (!log.out_) return io_error(log.path_ + ": cannot write the metrics file");
  log.out_ << kept;
  HYDRA_ASSIGN_OR_RETURN(log.tb_, TensorBoardWriter::open((fs::path(run_dir) / "tb").string()));
  return log;
}

void MetricsLog::write(int64_t step, const std::string& stage, const MetricValues& values) {
  std::ostringstream os;
  os << "{\"step\": " << step << ", \"stage\": \"" << stage << "\"";
  for (const auto& [k, v] : values) os << ", \"" << k << "\": " << json_number(v);
  os << "}\n";
  out_ << os.str();
  tb_.scalars(step, values);
}

void MetricsLog::flush() {
  out_.flush();
  tb_.flush();
}

Progress::Progress(int64_t first_step, int64_t last_step, bool tty, int64_t every)
    : first_(first_step), last_(last_step), every_(std::max<int64_t>(1, every)), tty_(tty) {}

void Progress::update(int64_t step, const std::string& stage, double loss, double lr,
                      double tokens_per_s, double elapsed_s, double mfu) {
  const int64_t done = step - first_, total = std::max<int64_t>(1, last_ - first_);
  // The ETA from this process's own pace (elapsed_s counts earlier runs of a resumed job too).
  const double mine =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const double eta = done > 0 ? mine / double(done) * double(total - done) : NAN;
  char mfu_text[32] = "";
  if (mfu >= 0)
    std::snprintf(mfu_text, sizeof mfu_text, tty_ ? " MFU %.1f%%" : "  MFU %.1f%%", 100 * mfu);
  char line[320];
  if (tty_) {
    const int width = 24, fill = static_cast<int>(width * double(done) / double(total));
    std::string bar(static_cast<std::size_t>(fill), '#');
    bar.resize(width, '.');
    std::snprintf(line, sizeof line,
                  "\r%-12s step %ld/%ld [%s] loss %.4f lr %.2e %7.0f tok/s%s ETA %s   ",
                  stage.c_str(), static_cast<long>(step), static_cast<long>(last_), bar.c_str(),
                  loss, lr, tokens_per_s, mfu_text, format_duration(eta).c_str());
    std::cerr << line << std::flush;
    drawn_ = true;
  } else if (step % every_ == 0 || step == last_) {
    std::snprintf(line, sizeof line,
                  "step %ld/%ld  stage %s  loss %.4f  lr %.2e  %.0f tok/s%s  elapsed %s  ETA %s",
                  static_cast<long>(step), static_cast<long>(last_), stage.c_str(), loss, lr,
                  tokens_per_s, mfu_text, format_duration(elapsed_s).c_str(),
                  format_duration(eta).c_str());
    std::cout << line << std::endl;
  }
}

void Progress::message(const std::string& line) {
  if (tty_ && drawn_) std::cerr << "\r\033[K";
  std::cout << line << std::endl;
}

void Progress::finish() {
  if (tty_ && drawn_) std::cerr << "\n";
  drawn_ = false;
}

}  // namespace hydra::trainer
