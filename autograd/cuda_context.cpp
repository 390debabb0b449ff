#include "autograd/cuda_context.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <unordered_map>
#include <vector>

#include "base/check.h"

#if HYDRA_WITH_CUDA
#include "kernels/device_runtime.h"
#endif

namespace hydra {

std::string CudaMemoryStats::str() const {
  auto mib = [](std::size_t b) { return static_cast<double>(b) / (1 << 20); };
  std::ostringstream os;
  os.precision(1);
  os << std::fixed << "allocated " << mib(allocated) << " MiB, reserved " << mib(reserved)
     << " MiB, peak allocated " << mib(peak_allocated) << " MiB, peak reserved "
     << mib(peak_reserved) << " MiB, " << num_driver_allocations << " cudaMalloc calls, "
     << num_cache_flushes << " cache flushes";
  return os.str();
}

#if HYDRA_WITH_CUDA

bool cuda_available() { return kernels::cuda::device_count() > 0; }
int cuda_device_count() { return kernels::cuda::device_count(); }

namespace {

std::atomic<bool> g_poison{false};

// Sizes round up to a bin: 512-byte steps below 1 MiB, then four bins per power of two (<= 25%
// slack).
std::size_t bin_size(std::size_t bytes) {
  constexpr std::size_t kSmall = 1 << 20;
  if (bytes <= kSmall) return std::max<std::size_t>(512, (bytes + 511) / 512 * 512);
  std::size_t p = 1;
  while (p * 2 <= bytes) p *= 2;
  const std::size_t step = p / 4;
  return (bytes + step - 1) / step * step;
}

struct Block {
  void* ptr = nullptr;
  std::size_t size = 0;
  void* stream = nullptr;              // the stream it belongs to
  std::vector<void*> used_on_streams;  // other streams (record_stream)
};

class CachingAllocator final : public Allocator {
 public:
  explicit CachingAllocator(int device) : device_(device) {}

  void* allocate(std::size_t bytes, void* stream) override {
    if (bytes == 0) return nullptr;
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.num_allocations;
    process_pending();
    const std::size_t size = bin_size(bytes);
    auto& bin = free_[{stream, size}];
    void* ptr = nullptr;
    if (!bin.empty()) {
      ptr = bin.back();
      bin.pop_back();
    } else {
      ptr = kernels::cuda::device_malloc(size, device_);
      if (ptr == nullptr) {  // out of memory: give the cache back to the driver and try once more
        ++stats_.num_cache_flushes;
        release_cached();
        ptr = kernels::cuda::device_malloc(size, device_);
      }
      HYDRA_CHECK(ptr != nullptr)
          << "CUDA out of memory on device " << device_ << " allocating " << bytes << " bytes ("
          << size << " with rounding); " << stats_.str()
          << ". Reduce the batch size or sequence length, or enable recomputation.";
      ++stats_.num_driver_allocations;
      stats_.reserved += size;
      stats_.peak_reserved = std::max(stats_.peak_reserved, stats_.reserved);
    }
    active_[ptr] = Block{ptr, size, stream, {}};
    if (g_poison.load(std::memory_order_relaxed))
      kernels::cuda::memset_async(ptr, 0xff, size, stream);
    stats_.allocated += size;
    stats_.peak_allocated = std::max(stats_.peak_allocated, stats_.allocated);
    return ptr;
  }

  void deallocate(void* ptr, std::size_t, void*) override {
    if (ptr == nullptr) return;
    std::lock_guard<std::mutex> lock(mu_);
    auto it = active_.find(ptr);
    HYDRA_CHECK(it != active_.end()) << "cuda allocator: free of an unknown pointer";
    Block block = std::move(it->second);
    active_.erase(it);
    stats_.allocated -= block.size;
    if (block.used_on_streams.empty()) {
      free_[{block.stream, block.size}].push_back(block.ptr);
      return;
    }
    Pending pending{block, {}};
    for (void* s : block.used_on_streams) {
      void* e = kernels::cuda::event_create();
      kernels::cuda::event_record(e, s);
      pending.events.push_back(e);
    }
    pending_.push_back(std::move(pending));
  }

  void record_stream(void* ptr, void* stream) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = active_.find(ptr);
    HYDRA_CHECK(it != active_.end())
        << "record_stream: pointer not from the CUDA caching allocator";
    if (stream == it->second.stream) return;
    auto& s = it->second.used_on_streams;
    if (std::find(s.begin(), s.end(), stream) == s.end()) s.push_back(stream);
  }

  CudaMemoryStats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return stats_;
  }
  void reset_peaks() {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.peak_allocated = stats_.allocated;
    stats_.peak_reserved = stats_.reserved;
  }
  void empty_cache() {
    std::lock_guard<std::mutex> lock(mu_);
    process_pending();
    release_cached();
  }

 private:
  struct Pending {
    Block block;
    std::vector<void*> events;
  };

  // Moves blocks whose cross-stream uses have finished back to their free lists.
  void process_pending() {
    for (auto it = pending_.begin(); it != pending_.end();) {
      const bool done = std::all_of(it->events.begin(), it->events.end(),
                                    [](void* e) { return kernels::cuda::event_query(e); });
      if (!done) {
        ++it;
        continue;
      }
      for (void* e : it->events) kernels::cuda::event_destroy(e);
      free_[{it->block.stream, it->block.size}].push_back(it->block.ptr);
      it = pending_.erase(it);
    }
  }

  void release_cached() {
    kernels::cuda::device_synchronize(device_);
    for (auto& [key, ptrs] : free_) {
      for (void* p : ptrs) {
        kernels::cuda::device_free(p, device_);
        stats_.reserved -= key.second;
      }
      ptrs.clear();
    }
  }

  int device_;
  std::mutex mu_;
  std::map<std::pair<void*, std::size_t>, std::vector<void*>> free_;
  std::unordered_map<void*, Block> active_;
  std::list<Pending> pending_;
  CudaMemoryStats stats_;
};

struct DeviceState {
  std::unique_ptr<CachingAllocator> allocator;
  void* compute = nullptr;
  void* comm = nullptr;
};

DeviceState& state(int device) {
  static std::mutex mu;
  static std::vector<std::unique_ptr<DeviceState>> states;
  std::lock_guard<std::mutex> lock(mu);
  HYDRA_CHECK(device >= 0 && device < cuda_device_count())
      << "CUDA device " << device << " does not exist (" << cuda_device_count() << " present)";
  if (states.size() <= static_cast<std::size_t>(device)) states.resize(device + 1);
  auto& s = states[device];
  if (!s) {
    s = std::make_unique<DeviceState>();
    s->allocator = std::make_unique<CachingAllocator>(device);
    s->compute = kernels::cuda::stream_create(device);
    s->comm = kernels::cuda::stream_create(device);
  }
  return *s;
}

// Page-locked host blocks by size class. A block read by async copies goes back to the cache only
// when the events recorded after those copies have completed.
class PinnedAllocator final : public Allocator {
 public:
  void* allocate(std::size_t bytes, void*) override {
    if (bytes == 0) return nullptr;
    // Large blocks (a checkpoint's staging buffers, GBs in one piece) are rounded to 2 MB (huge
    // pages), not to a quarter of their power of two (up to 25% more page-locked memory).
    constexpr std::size_t kHuge = std::size_t{2} << 20;
    const std::size_t size = bytes >= kernels::cuda::kPinnedTouchFirstBytes
                                 ? (bytes + kHuge - 1) / kHuge * kHuge
                                 : bin_size(bytes);
    std::unique_lock<std::mutex> lock(mu_);
    process_pending();
    void* ptr = nullptr;
    auto& bin = free_[size];
    if (!bin.empty()) {
      ptr = bin.back();
      bin.pop_back();
    } else {
      // Page-locking takes the driver about a second a GB: outside the lock, so that a thread
      // setting up large buffers (a checkpoint's, in the background) does not hold up the small
      // staging copies of the training thread.
      lock.unlock();
      ptr = kernels::cuda::host_malloc_pinned(size);
      lock.lock();
      ++stats_.num_driver_allocations;
      stats_.reserved += size;
    }
    active_[ptr] = {size, {}};
    stats_.allocated += size;
    return ptr;
  }
  void deallocate(void* ptr, std::size_t, void*) override {
    if (ptr == nullptr) return;
    std::lock_guard<std::mutex> lock(mu_);
    auto it = active_.find(ptr);
    HYDRA_CHECK(it != active_.end()) << "pinned allocator: free of an unknown pointer";
    Entry e = std::move(it->second);
    active_.erase(it);
    stats_.allocated -= e.size;
    if (e.events.empty()) {
      free_[e.size].push_back(ptr);
    } else {
      pending_.push_back({ptr, std::move(e)});
    }
  }
  void record_use(void* ptr, void* stream) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = active_.find(ptr);
    if (it == active_.end()) return;  // not a pinned block: nothing to protect
    // A block kept for long (a checkpoint's staging buffers, copied into at every save) would
    // otherwise collect an event per copy until it is freed.
    auto& events = it->second.events;
    events.erase(std::remove_if(events.begin(), events.end(),
                                [](void* e) {
                                  if (!kernels::cuda::event_query(e)) return false;
                                  kernels::cuda::event_destroy(e);
                                  return true;
                                }),
                 events.end());
    void* ev = kernels::cuda::event_create();
    kernels::cuda::event_record(ev, stream);
    it->second.events.push_back(ev);
  }
  PinnedMemoryStats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return stats_;
  }

 private:
  struct Entry {
    std::size_t size = 0;
    std::vector<void*> events;
  };
  void process_pending() {
    for (auto it = pending_.begin(); it != pending_.end();) {
      auto& events = it->second.events;
      if (!std::all_of(events.begin(), events.end(),
                       [](void* e) { return kernels::cuda::event_query(e); })) {
        ++it;
        continue;
      }
      for (void* e : events) kernels::cuda::event_destroy(e);
      free_[it->second.size].push_back(it->first);
      it = pending_.erase(it);
    }
  }
  std::mutex mu_;
  std::map<std::size_t, std::vector<void*>> free_;
  std::unordered_map<void*, Entry> active_;
  std::list<std::pair<void*, Entry>> pending_;
  PinnedMemoryStats stats_;
};

PinnedAllocator& pinned() {
  static auto* a =
      new PinnedAllocator();  // outlives every tensor (no destruction-order races at exit)
  return *a;
}

}  // namespace

Allocator& cuda_pinned_allocator() { return pinned(); }
void cuda_use_device_on_this_thread(Device device) {
  if (device.is_cuda()) kernels::cuda::set_device(static_cast<int>(device.index));
}
void cuda_record_pinned_use(void* ptr, void* stream) { pinned().record_use(ptr, stream); }
PinnedMemoryStats cuda_pinned_memory_stats() { return pinned().stats(); }

CudaEvent::CudaEvent() : event_(kernels::cuda::event_create()) {}
CudaEvent::~CudaEvent() {
  if (event_) kernels::cuda::event_destroy(event_);
}
void CudaEvent::record(void* stream) { kernels::cuda::event_record(event_, stream); }
void CudaEvent::wait_on(void* stream) const { kernels::cuda::stream_wait_event(stream, event_); }
bool CudaEvent::done() const { return kernels::cuda::event_query(event_); }
void CudaEvent::synchronize() const { kernels::cuda::event_synchronize(event_); }
float CudaEvent::ms_since(const CudaEvent& start) const {
  return kernels::cuda::event_elapsed_ms(start.event_, event_);
}

void cuda_stream_wait(void* waiter, void* signaller) {
  if (waiter == signaller) return;
  CudaEvent e;
  e.record(signaller);
  e.wait_on(waiter);  // destroying an event with pending waits is allowed: the wait keeps its state
}

Allocator& cuda_allocator(int device) { return *state(device).allocator; }
void cuda_set_poison_allocations(bool on) { g_poison.store(on); }
CudaMemoryStats cuda_memory_stats(int device) { return state(device).allocator->stats(); }
std::size_t cuda_total_memory(int device) { return kernels::cuda::device_total_memory(device); }
void cuda_reset_peak_stats(int device) { state(device).allocator->reset_peaks(); }
void cuda_empty_cache(int device) { state(device).allocator->empty_cache(); }
void cuda_record_stream(void* ptr, int device, void* stream) {
  state(device).allocator->record_stream(ptr, stream);
}
void* cuda_compute_stream(int device) { return state(device).compute; }
void* cuda_comm_stream(int device) { return state(device).comm; }
void* current_stream(Device device) {
  return device.is_cuda() ? state(device.index).compute : nullptr;
}

#else  // !HYDRA_WITH_CUDA

bool cuda_available() { return false; }
int cuda_device_count() { return 0; }

namespace {
[[noreturn]] void no_cuda() {
  HYDRA_FAIL() << "this build of Hydra has no CUDA backend (configure with -DHYDRA_CUDA=ON)";
}
}  // namespace

Allocator& cuda_allocator(int) { no_cuda(); }
CudaMemoryStats cuda_memory_stats(int) { no_cuda(); }
std::size_t cuda_total_memory(int) { no_cuda(); }
void cuda_reset_peak_stats(int) { no_cuda(); }
void cuda_empty_cache(int) { no_cuda(); }
void cuda_record_stream(void*, int, void*) { no_cuda(); }
void cuda_set_poison_allocations(bool) {}
void* cuda_compute_stream(int) { no_cuda(); }
void* cuda_comm_stream(int) { no_cuda(); }
Allocator& cuda_pinned_allocator() { no_cuda(); }
void cuda_use_device_on_this_thread(Device) {}
void cuda_record_pinned_use(void*, void*) {}
PinnedMemoryStats cuda_pinned_memory_stats() { return {}; }
CudaEvent::CudaEvent() { no_cuda(); }
CudaEvent::~CudaEvent() = default;
void CudaEvent::record(void*) { no_cuda(); }
void CudaEvent::wait_on(void*) const { no_cuda(); }
bool CudaEvent::done() const { no_cuda(); }
void CudaEvent::synchronize() const { no_cuda(); }
float CudaEvent::ms_since(const CudaEvent&) const { no_cuda(); }
void cuda_stream_wait(void*, void*) { no_cuda(); }
void* current_stream(Device device) {
  if (device.is_cuda()) no_cuda();
  return nullptr;
}

#endif

}  // namespace hydra
