// Timing and reporting helpers for the benchmarks: medians of repeats after warm-up, a printed
// table, and rows collected for a JSON file.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <map>
#include <string>
#include <vector>

namespace hydra::bench {

struct Timing {
  double median_ms = 0, min_ms = 0, max_ms = 0;
  int repeats = 0;
};

// Runs fn `warmup` times untimed, then `repeats` times timed (wall clock).
inline Timing time_cpu(const std::function<void()>& fn, int repeats = 7, int warmup = 2) {
  for (int i = 0; i < warmup; ++i) fn();
  std::vector<double> ms;
  for (int i = 0; i < repeats; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    const auto t1 = std::chrono::steady_clock::now();
    ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  return {ms[ms.size() / 2], ms.front(), ms.back(), repeats};
}

// One result: a name, string fields and numeric fields, in insertion order.
struct Row {
  std::string bench;
  std::vector<std::pair<std::string, std::string>> text;
  std::vector<std::pair<std::string, double>> values;
};

class Report {
 public:
  void add(Row row) { rows_.push_back(std::move(row)); }
  const std::vector<Row>& rows() const { return rows_; }

  void write_json(const std::string& path, const std::map<std::string, std::string>& meta) const {
    std::ofstream out(path);
    out << "{\n  \"meta\": {";
    bool first = true;
    for (const auto& [k, v] : meta) {
      out << (first ? "" : ", ") << "\"" << k << "\": \"" << v << "\"";
      first = false;
    }
    out << "},\n  \"rows\": [\n";
    for (std::size_t i = 0; i < rows_.size(); ++i) {
      const Row& r = rows_[i];
      out << "    {\"bench\": \"" << r.bench << "\"";
      for (const auto& [k, v] : r.text) out << ", \"" << k << "\": \"" << v << "\"";
      for (const auto& [k, v] : r.values) out << ", \"" << k << "\": " << v;
      out << "}" << (i + 1 < rows_.size() ? "," : "") << "\n";
    }
    out << "  ]\n}\n";
  }

 private:
  std::vector<Row> rows_;
};

}  // namespace hydra::bench
