// Device trace: what the GPU ran and when, from the GPU's own clock. With HYDRA_TRACE=<file.json>
// in the environment, hydra-train records (through CUPTI's activity API) every kernel, copy and
// memset of the steps after the first, writes them as a Chrome trace (open it in
// https://ui.perfetto.dev or chrome://tracing) and prints where the device sat idle: its busy time
// a step, the gaps between its activities by size, the largest gaps with the activities on either
// side, and each kernel's time a step. Unlike HYDRA_PROFILE, nothing is added to the streams, so
// the step runs as it does untraced (CUPTI's own cost is about 1 us of host time a launch).
#pragma once

#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

namespace hydra::kernels {

// One activity of the device, in nanoseconds of CUPTI's clock.
struct TraceRecord {
  uint64_t start = 0, end = 0;
  uint32_t stream = 0;
  std::string name;  // the kernel's name, or "memcpy HtoD" / "memset"
};
// A moment of the host (a step's start), on the same clock.
struct TraceMark {
  uint64_t time = 0;
  std::string name;
};

struct TraceGap {
  double us = 0;
  std::string before, after;  // the activities that end and begin it
};

// The device's time between the first and the last mark (the marks split it into steps).
struct TraceSummary {
  int64_t steps = 0;
  double wall_ms = 0;  // a step, from mark to mark
  double busy_ms = 0;  // a step: the union of the activities
  // The step of median length (the lower median) and the device's busy time in it: the steady
  // step, where the means include a last step that reads statistics (train.stats_every).
  double median_step_ms = 0, median_busy_ms = 0;
  double activities = 0;  // a step
  // Idle time a step in gaps of: < 5 us, 5-20 us, 20-100 us, >= 100 us (the time before the
  // first activity and after the last included).
  double idle_ms[4] = {0, 0, 0, 0};
  double gaps[4] = {0, 0, 0, 0};  // their number a step
  std::vector<TraceGap> largest;  // longest first
  struct Kernel {
    std::string name;
    double ms = 0, count = 0;  // a step
  };
  std::vector<Kernel> kernels;  // longest first
  std::string file;             // where the trace was written ("": nowhere)
};

// Summarises records over [marks.front(), marks.back()] (clipped to it); `top` gaps and kernels.
TraceSummary summarize_trace(std::vector<TraceRecord> records, const std::vector<TraceMark>& marks,
                             int top = 20);
void print_trace_summary(std::ostream& os, const TraceSummary& s);
// The records and marks as Chrome trace JSON (times in microseconds from the first mark).
void write_chrome_trace(std::ostream& os, const std::vector<TraceRecord>& records,
                        const std::vector<TraceMark>& marks);
// The kernel name as a short family name: the demangled function's name without its namespace,
// arguments and return type, with its template arguments cut to `max` characters.
std::string short_kernel_name(const std::string& mangled, size_t max = 60);

// The path in HYDRA_TRACE, or "" when unset.
const std::string& device_trace_path();
// The trace file of rank `rank` of `ranks` for `path`: the path itself for one rank, else with
// ".rank<rank>" before its extension (trace.json -> trace.rank1.json), so ranks do not share a
// file.
std::string device_trace_file(const std::string& path, int64_t rank, int64_t ranks);
// Starts recording, to be written to `file` ("": none) when it stops (CUDA builds; false with a
// reason in *why otherwise, when the file cannot be written, or when CUPTI refuses).
bool device_trace_start(const std::string& file, std::string* why);
bool device_trace_active();
// A moment on the device's clock (no-op when not recording). With a stream: when the device
// reaches the mark in that stream's queue (a memset of 7 bytes is queued there and its start
// taken), so that steps queued ahead of their start are still split where the device begins them;
// without one, the host's moment.
void device_trace_mark(const std::string& name, void* stream = nullptr);
// Stops recording (the caller has synchronized the device), writes the Chrome trace to the file
// given to device_trace_start and returns the summary; empty when not recording.
TraceSummary device_trace_stop();

}  // namespace hydra::kernels
