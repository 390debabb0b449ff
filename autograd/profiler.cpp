#include "autograd/profiler.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <iomanip>
#include <map>
#include <mutex>
#include <string_view>
#include <vector>

#include "autograd/cuda_context.h"

#if HYDRA_WITH_CUDA
#include <cuda_runtime.h>

#include "kernels/cuda/check.cuh"
#endif

namespace hydra {
namespace {

struct Totals {
  double ms = 0;
  int64_t launches = 0;
};

// Launches whose CUDA events have not been read yet; read (synchronising) when many are pending and
// at the report, so the events are reused.
struct Pending {
  std::string name;
  std::string op;  // HYDRA_PROFILE=ops: the op row it is also charged to
  bool cuda = false;
  bool ended = false;  // its stop event is recorded (a scope around others ends after them)
  Device device;
  std::chrono::steady_clock::time_point t0;
  double host_ms = 0;  // CPU launches: measured at the end
#if HYDRA_WITH_CUDA
  cudaEvent_t start = nullptr, stop = nullptr;
#endif
};

struct Profile {
  std::mutex mu;
  std::chrono::steady_clock::time_point since = std::chrono::steady_clock::now();  // last reset
  // The host's time between the end of one launch and the start of the next, charged to the next
  // (HYDRA_PROFILE=2: "host before <family>"): where the host, not the device, sets the pace.
  std::chrono::steady_clock::time_point last_end{};
  std::string last_kernel;  // the latest launch's family: where a wait for the host comes from
  std::map<std::string, Totals> totals;
  std::vector<Pending> pending;
  std::vector<int> free_slots;
  std::vector<int> unclaimed;  // HYDRA_PROFILE=ops: forward launches waiting for their node

  void resolve_locked() {
    for (std::size_t i = 0; i < pending.size(); ++i) {
      Pending& p = pending[i];
      if (p.name.empty() || !p.ended) continue;
      const double before = totals[p.name].ms;
#if HYDRA_WITH_CUDA
      if (p.cuda) {
        HYDRA_CUDA_CHECK(cudaEventSynchronize(p.stop));
        float ms = 0;
        HYDRA_CUDA_CHECK(cudaEventElapsedTime(&ms, p.start, p.stop));
        totals[p.name].ms += ms;
      }
#endif
      if (!p.cuda) totals[p.name].ms += p.host_ms;
      ++totals[p.name].launches;
      if (!p.op.empty()) {
        totals[p.op].ms += totals[p.name].ms - before;
        ++totals[p.op].launches;
      }
      p.name.clear();
      p.op.clear();
      free_slots.push_back(static_cast<int>(i));
    }
    unclaimed.clear();  // their slots may be reused: those launches stay "(outside autograd)"
  }
};

thread_local const std::string* backward_op = nullptr;

Profile& profile() {
  static Profile* p = new Profile();  // outlives static destructors that may still launch kernels
  return *p;
}

}  // namespace

bool kernel_profile_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("HYDRA_PROFILE");
    return v != nullptr && *v != '\0' && std::string(v) != "0";
  }();
  return on;
}

bool kernel_profile_ops() {
  static const bool on = [] {
    const char* v = std::getenv("HYDRA_PROFILE");
    return v != nullptr && std::string(v) == "ops";
  }();
  return on;
}

void kernel_profile_node_created(const std::string& op) {
  if (!kernel_profile_ops() || backward_op != nullptr) return;
  Profile& pr = profile();
  std::lock_guard<std::mutex> lock(pr.mu);
  for (int slot : pr.unclaimed) pr.pending[slot].op = "op fwd " + op;
  pr.unclaimed.clear();
}

KernelProfileBackwardScope::KernelProfileBackwardScope(const std::string& op) {
  if (!kernel_profile_ops()) return;
  previous_ = backward_op;
  backward_op = &op;
}

KernelProfileBackwardScope::~KernelProfileBackwardScope() {
  if (kernel_profile_ops()) backward_op = previous_;
}

bool kernel_profile_detailed() {
  static const bool on = [] {
    const char* v = std::getenv("HYDRA_PROFILE");
    return v != nullptr && std::string(v) == "2";
  }();
  return on;
}

void KernelProfileScope::begin(Device device, const char* name) {
  Profile& pr = profile();
  std::lock_guard<std::mutex> lock(pr.mu);
  if (pr.free_slots.empty() && pr.pending.size() >= 4096) pr.resolve_locked();
  if (pr.free_slots.empty()) {
    pr.pending.emplace_back();
    pr.free_slots.push_back(static_cast<int>(pr.pending.size()) - 1);
  }
  slot_ = pr.free_slots.back();
  pr.free_slots.pop_back();
  Pending& p = pr.pending[slot_];
  p.name = name;
  const bool host = std::string_view(name).rfind("host", 0) == 0;
  // HYDRA_PROFILE=2: each wait for a copy to the host is named by the launch before it, the op
  // whose result the host reads (or the op after which it reads another).
  if (kernel_profile_detailed() && host && std::string_view(name).rfind("host: wait", 0) == 0)
    p.name += " after " + (pr.last_kernel.empty() ? std::string("(none)") : pr.last_kernel);
  if (!host) pr.last_kernel = name;
  p.op.clear();
  if (kernel_profile_ops() && !host) {
    if (backward_op != nullptr) {
      p.op = "op bwd " + *backward_op;
    } else {
      p.op = "op (outside autograd)";
      pr.unclaimed.push_back(slot_);
    }
  }
  p.ended = false;
  p.cuda = device.is_cuda();
  p.device = device;
#if HYDRA_WITH_CUDA
  if (p.cuda) {
    if (p.start == nullptr) {
      HYDRA_CUDA_CHECK(cudaEventCreate(&p.start));
      HYDRA_CUDA_CHECK(cudaEventCreate(&p.stop));
    }
    HYDRA_CUDA_CHECK(cudaEventRecord(p.start, static_cast<cudaStream_t>(current_stream(device))));
  }
#endif
  p.t0 = std::chrono::steady_clock::now();
  if (kernel_profile_detailed() && !host && pr.last_end.time_since_epoch().count() != 0) {
    Totals& gap = pr.totals["host before " + std::string(name)];
    gap.ms += std::chrono::duration<double, std::milli>(p.t0 - pr.last_end).count();
    ++gap.launches;
  }
  pr.last_end = p.t0;  // a scope inside this one is charged from here
  active_ = true;
}

void KernelProfileScope::end() {
  Profile& pr = profile();
  std::lock_guard<std::mutex> lock(pr.mu);
  Pending& p = pr.pending[slot_];
  pr.last_end = std::chrono::steady_clock::now();
#if HYDRA_WITH_CUDA
  if (p.cuda) {
    HYDRA_CUDA_CHECK(cudaEventRecord(p.stop, static_cast<cudaStream_t>(current_stream(p.device))));
    p.ended = true;
    return;  // read later
  }
#endif
  // Read at the next resolve, as the CUDA ones are: a forward launch's op is named by the node made
  // after it.
  p.host_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - p.t0).count();
  p.ended = true;
}

void kernel_profile_reset() {
  Profile& pr = profile();
  std::lock_guard<std::mutex> lock(pr.mu);
  pr.resolve_locked();
  pr.totals.clear();
  pr.since = std::chrono::steady_clock::now();
}

void kernel_profile_report(std::ostream& os, int64_t steps) {
  Profile& pr = profile();
  std::lock_guard<std::mutex> lock(pr.mu);
  pr.resolve_locked();
  std::vector<std::pair<std::string, Totals>> rows(pr.totals.begin(), pr.totals.end());
  std::sort(rows.begin(), rows.end(),
            [](const auto& a, const auto& b) { return a.second.ms > b.second.ms; });
  const double wall =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - pr.since)
          .count();
  double total = 0;  // device kernels; detailed rows ("gemm MxNxK ...", a space in the name) are
                     // inside their family's, host rows ("host: ...") are not kernels
  for (const auto& r : rows)
    if (r.first.find(' ') == std::string::npos) total += r.second.ms;
  int64_t launches = 0;
  for (const auto& r : rows)
    if (r.first.find(' ') == std::string::npos) launches += r.second.launches;
  os << "kernel profile (HYDRA_PROFILE): " << std::fixed << std::setprecision(1) << total
     << " ms in kernels, " << launches << " launches";
  if (steps > 0)
    os << "; per step (" << steps
       << " steps after the first, evaluation included): " << total / double(steps)
       << " ms in kernels, " << launches / steps << " launches, " << wall / double(steps)
       << " ms of wall time (kernels " << std::setprecision(0)
       << (wall > 0 ? 100.0 * total / wall : 0.0) << "% of it; the rest the device waits for "
       << "the host)" << std::setprecision(1);
  os << "\n";
  os << "  " << std::left << std::setw(28) << "kernel" << std::right << std::setw(12) << "total ms"
     << std::setw(10) << "share" << std::setw(12) << "launches" << std::setw(12) << "us/launch"
     << "\n";
  for (const auto& [name, t] : rows)
    os << "  " << std::left << std::setw(28) << name << std::right << std::setw(12)
       << std::setprecision(1) << t.ms << std::setw(9) << std::setprecision(1)
       << (total > 0 ? 100.0 * t.ms / total : 0.0) << "%" << std::setw(12) << t.launches
       << std::setw(12) << std::setprecision(1)
       << (t.launches > 0 ? 1000.0 * t.ms / t.launches : 0.0) << "\n";
  os << std::defaultfloat;
  pr.totals.clear();
}

}  // namespace hydra
