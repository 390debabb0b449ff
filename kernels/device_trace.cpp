// Device trace (device_trace.h): the summary and the Chrome trace on any build; the recording
// through CUPTI's activity API on CUDA builds.
#include "kernels/device_trace.h"

#include <cxxabi.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>

#if HYDRA_WITH_CUDA
#include <cuda_runtime.h>
#include <cupti.h>
#endif

namespace hydra::kernels {

std::string short_kernel_name(const std::string& mangled, size_t max) {
  if (mangled.rfind("_Z", 0) != 0) return mangled.substr(0, max);  // not a mangled name
  int status = 0;
  std::unique_ptr<char, void (*)(void*)> d(
      abi::__cxa_demangle(mangled.c_str(), nullptr, nullptr, &status), std::free);
  if (status != 0 || d == nullptr) return mangled.substr(0, max);
  std::string s = d.get();
  for (size_t p; (p = s.find("(anonymous namespace)::")) != std::string::npos;) s.erase(p, 23);
  // The function's name ends at the '(' of its arguments, at template depth 0; its return type
  // ends at the last space before it, its namespaces at the last "::", both at depth 0.
  size_t begin = 0, end = s.size();
  int depth = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    if (c == '<') ++depth;
    if (c == '>') --depth;
    if (depth != 0) continue;
    if (c == '(') {
      end = i;
      break;
    }
    if (c == ' ') begin = i + 1;
    if (c == ':' && i + 1 < s.size() && s[i + 1] == ':') begin = i + 2;
  }
  std::string name = s.substr(begin, end - begin);
  const size_t lt = name.find('<');
  if (name.size() > max && lt != std::string::npos && lt + 5 <= max)
    name = name.substr(0, max - 4) + "...>";
  return name;
}

TraceSummary summarize_trace(std::vector<TraceRecord> records, const std::vector<TraceMark>& marks,
                             int top) {
  TraceSummary s;
  if (marks.size() < 2) return s;
  const uint64_t t0 = marks.front().time, t1 = marks.back().time;
  s.steps = static_cast<int64_t>(marks.size()) - 1;
  const double per = 1.0 / double(s.steps);
  s.wall_ms = double(t1 - t0) * 1e-6 * per;
  std::erase_if(records, [&](const TraceRecord& r) { return r.end <= t0 || r.start >= t1; });
  std::sort(records.begin(), records.end(), [](const TraceRecord& a, const TraceRecord& b) {
    return a.start != b.start ? a.start < b.start : a.end < b.end;
  });
  std::map<std::string, std::string> shortened;
  auto short_of = [&](const std::string& n) -> const std::string& {
    auto it = shortened.find(n);
    if (it == shortened.end()) it = shortened.emplace(n, short_kernel_name(n)).first;
    return it->second;
  };
  std::map<std::string, TraceSummary::Kernel> kernels;
  std::vector<TraceGap> gaps;
  uint64_t cursor = t0, busy = 0;
  std::string last = "(the first mark)";
  auto gap = [&](uint64_t from, uint64_t to, const std::string& after) {
    const double us = double(to - from) * 1e-3;
    const int bucket = us < 5 ? 0 : us < 20 ? 1 : us < 100 ? 2 : 3;
    s.idle_ms[bucket] += us * 1e-3 * per;
    s.gaps[bucket] += per;
    gaps.push_back({us, last, after});
  };
  for (const TraceRecord& r : records) {
    const uint64_t a = std::max(r.start, t0), b = std::min(r.end, t1);
    const std::string& name = short_of(r.name);
    if (a > cursor) gap(cursor, a, name);
    if (b > cursor) {
      busy += b - std::max(a, cursor);
      cursor = b;
      last = name;
    }
    TraceSummary::Kernel& k = kernels[name];
    k.name = name;
    k.ms += double(b - a) * 1e-6 * per;
    k.count += per;
  }
  if (t1 > cursor) gap(cursor, t1, "(the last mark)");
  s.busy_ms = double(busy) * 1e-6 * per;
  // Each step's length and busy time (the union of its activities, clipped to it).
  std::vector<std::pair<uint64_t, uint64_t>> steps;  // (length, busy) in ns
  size_t first = 0;
  for (size_t i = 0; i + 1 < marks.size(); ++i) {
    const uint64_t a = marks[i].time, b = marks[i + 1].time;
    uint64_t at = a, on = 0;
    while (first < records.size() && records[first].end <= a) ++first;
    for (size_t j = first; j < records.size() && records[j].start < b; ++j) {
      const uint64_t lo = std::max({records[j].start, a, at}), hi = std::min(records[j].end, b);
      if (hi > lo) {
        on += hi - lo;
        at = hi;
      }
    }
    steps.push_back({b - a, on});
  }
  std::sort(steps.begin(), steps.end());
  const auto& median = steps[(steps.size() - 1) / 2];
  s.median_step_ms = double(median.first) * 1e-6;
  s.median_busy_ms = double(median.second) * 1e-6;
  s.activities = double(records.size()) * per;
  std::sort(gaps.begin(), gaps.end(),
            [](const TraceGap& a, const TraceGap& b) { return a.us > b.us; });
  gaps.resize(std::min<size_t>(gaps.size(), size_t(top)));
  s.largest = std::move(gaps);
  for (auto& [name, k] : kernels) s.kernels.push_back(k);
  std::sort(s.kernels.begin(), s.kernels.end(),
            [](const auto& a, const auto& b) { return a.ms > b.ms; });
  s.kernels.resize(std::min<size_t>(s.kernels.size(), size_t(top)));
  return s;
}

void print_trace_summary(std::ostream& os, const TraceSummary& s) {
  char line[512];
  std::snprintf(line, sizeof line,
                "device trace (HYDRA_TRACE): %ld steps; a step %.2f ms, the device busy %.2f ms "
                "(%.1f%%) over %.0f activities, idle %.2f ms\n",
                long(s.steps), s.wall_ms, s.busy_ms,
                s.wall_ms > 0 ? 100.0 * s.busy_ms / s.wall_ms : 0.0, s.activities,
                s.wall_ms - s.busy_ms);
  os << line;
  std::snprintf(line, sizeof line,
                "  the median step: %.2f ms, the device busy %.2f ms (%.1f%%) of it\n",
                s.median_step_ms, s.median_busy_ms,
                s.median_step_ms > 0 ? 100.0 * s.median_busy_ms / s.median_step_ms : 0.0);
  os << line;
  const char* sizes[4] = {"< 5 us", "5-20 us", "20-100 us", ">= 100 us"};
  os << "  idle a step in gaps of";
  for (int i = 0; i < 4; ++i) {
    std::snprintf(line, sizeof line, "%s %s: %.2f ms (%.0f)", i ? "," : "", sizes[i], s.idle_ms[i],
                  s.gaps[i]);
    os << line;
  }
  os << "\n  the largest gaps (all steps):\n";
  for (const TraceGap& g : s.largest) {
    std::snprintf(line, sizeof line, "    %9.1f us  after %s, before %s\n", g.us, g.before.c_str(),
                  g.after.c_str());
    os << line;
  }
  os << "  activities a step, longest first:      ms    count\n";
  for (const auto& k : s.kernels) {
    std::snprintf(line, sizeof line, "    %-34s %8.3f %8.1f\n", k.name.c_str(), k.ms, k.count);
    os << line;
  }
}

namespace {

std::string json_string(const std::string& s) {
  std::string o = "\"";
  for (const char c : s) {
    if (c == '"' || c == '\\') o += '\\';
    if (static_cast<unsigned char>(c) < 0x20) continue;
    o += c;
  }
  return o + "\"";
}

}  // namespace

void write_chrome_trace(std::ostream& os, const std::vector<TraceRecord>& records,
                        const std::vector<TraceMark>& marks) {
  const uint64_t t0 = marks.empty() ? 0 : marks.front().time;
  auto us = [&](uint64_t t) { return (double(t) - double(t0)) * 1e-3; };
  std::map<std::string, std::string> shortened;
  char num[96];
  os << "{\"displayTimeUnit\": \"ns\", \"traceEvents\": [\n";
  os << "{\"name\": \"process_name\", \"ph\": \"M\", \"pid\": 0, \"args\": {\"name\": \"GPU\"}}";
  for (const TraceRecord& r : records) {
    auto it = shortened.find(r.name);
    if (it == shortened.end()) it = shortened.emplace(r.name, short_kernel_name(r.name)).first;
    std::snprintf(num, sizeof num, "%.3f, \"dur\": %.3f, \"pid\": 0, \"tid\": %u", us(r.start),
                  double(r.end - r.start) * 1e-3, r.stream);
    os << ",\n{\"name\": " << json_string(it->second) << ", \"ph\": \"X\", \"ts\": " << num
       << ", \"args\": {\"kernel\": " << json_string(r.name) << "}}";
  }
  for (const TraceMark& m : marks) {
    std::snprintf(num, sizeof num, "%.3f", us(m.time));
    os << ",\n{\"name\": " << json_string(m.name)
       << ", \"ph\": \"i\", \"s\": \"g\", \"ts\": " << num << ", \"pid\": 0, \"tid\": 0}";
  }
  os << "\n]}\n";
}

const std::string& device_trace_path() {
  static const std::string path = [] {
    const char* v = std::getenv("HYDRA_TRACE");
    return std::string(v != nullptr ? v : "");
  }();
  return path;
}

std::string device_trace_file(const std::string& path, int64_t rank, int64_t ranks) {
  if (ranks <= 1 || path.empty()) return path;
  const size_t slash = path.find_last_of('/');
  const size_t dot = path.find_last_of('.');
  const size_t base = slash == std::string::npos ? 0 : slash + 1;  // the file name's start
  const bool ext = dot != std::string::npos && dot > base;         // a dot, not a leading one
  const std::string tag = ".rank" + std::to_string(rank);
  return ext ? path.substr(0, dot) + tag + path.substr(dot) : path + tag;
}

namespace {

std::mutex g_mu;
std::string g_file;
std::vector<TraceRecord> g_records;
std::vector<TraceMark> g_marks;
std::vector<bool> g_marks_queued;      // per mark: queued on a stream (its time from the device)
std::vector<uint64_t> g_device_marks;  // the starts of the marks' memsets
bool g_active = false;
// The memset a mark queues: a size and value no other memset of ours has (they zero tensors).
constexpr uint64_t kMarkBytes = 7;
constexpr uint32_t kMarkValue = 0x4d;
void* g_mark_buffer = nullptr;  // one per process (the first traced device's)

#if HYDRA_WITH_CUDA
const char* copy_kind(uint8_t k) {
  switch (k) {
    case CUPTI_ACTIVITY_MEMCPY_KIND_HTOD:
      return "memcpy HtoD";
    case CUPTI_ACTIVITY_MEMCPY_KIND_DTOH:
      return "memcpy DtoH";
    case CUPTI_ACTIVITY_MEMCPY_KIND_DTOD:
      return "memcpy DtoD";
    case CUPTI_ACTIVITY_MEMCPY_KIND_PTOP:
      return "memcpy PtoP";
    default:
      return "memcpy";
  }
}

constexpr size_t kBufferBytes = size_t{8} << 20;

void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, kBufferBytes));
  *size = *buffer != nullptr ? kBufferBytes : 0;
  *max_records = 0;
}

void CUPTIAPI buffer_completed(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
  std::vector<TraceRecord> got;
  std::vector<uint64_t> marks;
  CUpti_Activity* rec = nullptr;
  while (cuptiActivityGetNextRecord(buffer, valid, &rec) == CUPTI_SUCCESS) {
    if (rec->kind == CUPTI_ACTIVITY_KIND_KERNEL ||
        rec->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) {
      const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(rec);
      got.push_back({k->start, k->end, k->streamId, k->name != nullptr ? k->name : "kernel"});
    } else if (rec->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
      const auto* m = reinterpret_cast<const CUpti_ActivityMemcpy6*>(rec);
      got.push_back({m->start, m->end, m->streamId, copy_kind(m->copyKind)});
    } else if (rec->kind == CUPTI_ACTIVITY_KIND_MEMSET) {
      const auto* m = reinterpret_cast<const CUpti_ActivityMemset4*>(rec);
      if (m->bytes == kMarkBytes && m->value == kMarkValue)
        marks.push_back(m->start);
      else
        got.push_back({m->start, m->end, m->streamId, "memset"});
    }
  }
  std::free(buffer);
  const std::lock_guard<std::mutex> lock(g_mu);
  g_device_marks.insert(g_device_marks.end(), marks.begin(), marks.end());
  g_records.insert(g_records.end(), std::make_move_iterator(got.begin()),
                   std::make_move_iterator(got.end()));
}

constexpr CUpti_ActivityKind kKinds[] = {CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL,
                                         CUPTI_ACTIVITY_KIND_MEMCPY, CUPTI_ACTIVITY_KIND_MEMSET};

bool cupti_ok(CUptiResult r, const char* what, std::string* why) {
  if (r == CUPTI_SUCCESS) return true;
  const char* msg = nullptr;
  cuptiGetResultString(r, &msg);
  if (why != nullptr)
    *why = std::string("CUPTI ") + what + ": " + (msg != nullptr ? msg : "error") +
           " (another profiler attached, or a driver without CUPTI support?)";
  return false;
}
#endif

}  // namespace

bool device_trace_start(const std::string& file, std::string* why) {
#if HYDRA_WITH_CUDA
  if (g_active) return true;
  if (!file.empty() && !std::ofstream(file)) {
    if (why != nullptr)
      *why = "HYDRA_TRACE: cannot write " + file + " (does its folder exist and is it writable?)";
    return false;
  }
  if (!cupti_ok(cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed),
                "cuptiActivityRegisterCallbacks", why))
    return false;
  for (const CUpti_ActivityKind k : kKinds)
    if (!cupti_ok(cuptiActivityEnable(k), "cuptiActivityEnable", why)) return false;
  const std::lock_guard<std::mutex> lock(g_mu);
  g_records.clear();
  g_marks.clear();
  g_marks_queued.clear();
  g_device_marks.clear();
  g_file = file;
  g_active = true;
  return true;
#else
  (void)file;
  if (why != nullptr)
    *why = "HYDRA_TRACE needs a CUDA build of Hydra (this one has no CUDA backend)";
  return false;
#endif
}

bool device_trace_active() { return g_active; }

void device_trace_mark(const std::string& name, void* stream) {
#if HYDRA_WITH_CUDA
  if (!g_active) return;
  uint64_t t = 0;
  if (cuptiGetTimestamp(&t) != CUPTI_SUCCESS) return;
  bool queued = false;
  if (stream != nullptr) {
    if (g_mark_buffer == nullptr && cudaMalloc(&g_mark_buffer, 16) != cudaSuccess)
      g_mark_buffer = nullptr;
    queued = g_mark_buffer != nullptr &&
             cudaMemsetAsync(g_mark_buffer, int(kMarkValue), kMarkBytes,
                             static_cast<cudaStream_t>(stream)) == cudaSuccess;
  }
  const std::lock_guard<std::mutex> lock(g_mu);
  g_marks.push_back({t, name});
  g_marks_queued.push_back(queued);
#else
  (void)name;
  (void)stream;
#endif
}

TraceSummary device_trace_stop() {
#if HYDRA_WITH_CUDA
  if (!g_active) return {};
  if (g_mark_buffer != nullptr) cudaDeviceSynchronize();  // the last marks' memsets ran
  cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
  for (const CUpti_ActivityKind k : kKinds) cuptiActivityDisable(k);
  std::vector<TraceRecord> records;
  std::vector<TraceMark> marks;
  std::vector<bool> queued;
  std::vector<uint64_t> device_marks;
  {
    const std::lock_guard<std::mutex> lock(g_mu);
    records.swap(g_records);
    marks.swap(g_marks);
    queued.swap(g_marks_queued);
    device_marks.swap(g_device_marks);
    g_active = false;
  }
  // The queued marks take the device's times, in order (when each reached the device: all or none).
  std::sort(device_marks.begin(), device_marks.end());
  if (device_marks.size() == size_t(std::count(queued.begin(), queued.end(), true))) {
    size_t next = 0;
    for (size_t i = 0; i < marks.size(); ++i)
      if (queued[i]) marks[i].time = device_marks[next++];
    std::stable_sort(marks.begin(), marks.end(),
                     [](const TraceMark& a, const TraceMark& b) { return a.time < b.time; });
  }
  if (!g_file.empty()) {
    std::ofstream f(g_file);
    write_chrome_trace(f, records, marks);
  }
  TraceSummary summary = summarize_trace(std::move(records), marks);
  summary.file = g_file;
  return summary;
#else
  return {};
#endif
}

}  // namespace hydra::kernels
