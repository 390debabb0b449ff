// Per-device CUDA state: the caching allocator, the compute and communication streams, and memory
// statistics. Without the CUDA backend every entry point raises a clear error (cuda_available() is
// false, so callers check that first).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "autograd/storage.h"

namespace hydra {

struct CudaMemoryStats {
  std::size_t allocated = 0;  // bytes handed out to tensors now
  std::size_t reserved = 0;   // bytes held from the driver (allocated + cached)
  std::size_t peak_allocated = 0;
  std::size_t peak_reserved = 0;
  int64_t num_allocations = 0;         // allocate() calls
  int64_t num_driver_allocations = 0;  // cudaMalloc calls (flat in the steady state)
  int64_t num_cache_flushes = 0;       // times the cache was emptied to satisfy a request
  std::string str() const;
};

// The caching allocator of `device`: size-class bins per stream; a block freed on its stream is
// reused by that stream at once and by others only after the events of record_stream() complete.
Allocator& cuda_allocator(int device);
CudaMemoryStats cuda_memory_stats(int device);
std::size_t cuda_total_memory(int device);  // the device's memory in bytes
void cuda_reset_peak_stats(int device);
void cuda_empty_cache(int device);  // returns cached blocks to the driver
// Marks memory at `ptr` (from cuda_allocator) as used by `stream` until work queued there now is
// done.
void cuda_record_stream(void* ptr, int device, void* stream);

// Test aid: fill every block the CUDA allocator hands out with 0xFF bytes (NaN in f32, bf16 and
// f64), so an output element a kernel fails to write shows up as NaN.
void cuda_set_poison_allocations(bool on);

// Page-locked host memory for asynchronous host-to-device copies, cached by size class like the
// device memory. A block an async copy reads from (cuda_record_pinned_use) returns to the cache
// only after that copy has finished, so freeing the host tensor early is safe.
Allocator& cuda_pinned_allocator();
// Makes `device` the calling thread's current CUDA device (a new thread starts on device 0, whose
// context page-locked allocations would otherwise create or join). Nothing for the CPU.
void cuda_use_device_on_this_thread(Device device);
void cuda_record_pinned_use(void* ptr, void* stream);
struct PinnedMemoryStats {
  std::size_t allocated = 0, reserved = 0;
  int64_t num_driver_allocations = 0;
};
PinnedMemoryStats cuda_pinned_memory_stats();

// A CUDA event (RAII) for ordering work across streams and for timing.
class CudaEvent {
 public:
  CudaEvent();
  ~CudaEvent();
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;
  void record(void* stream);
  void wait_on(void* stream) const;  // work queued on `stream` after this waits for the event
  bool done() const;                 // true when the recorded work has finished
  void synchronize() const;          // host waits
  float ms_since(const CudaEvent& start) const;

 private:
  void* event_ = nullptr;
};

// Makes work queued on `waiter` from now on wait for work queued on `signaller` so far.
void cuda_stream_wait(void* waiter, void* signaller);

// The streams kernels of a device run on. Both are created on first use; `compute` is where ops
// run.
void* cuda_compute_stream(int device);
void* cuda_comm_stream(int device);
void* current_stream(Device device);  // nullptr on the CPU

}  // namespace hydra
