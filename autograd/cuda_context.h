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
void cuda_reset_peak_stats(int device);
void cuda_empty_cache(int device);  // returns cached blocks to the driver
// Marks memory at `ptr` (from cuda_allocator) as used by `stream` until work queued there now is
// done.
void cuda_record_stream(void* ptr, int device, void* stream);

// Test aid: fill every block the CUDA allocator hands out with 0xFF bytes (NaN in f32, bf16 and f64), so
// an output element a kernel fails to write shows up as NaN.
void cuda_set_poison_allocations(bool on);

// The streams kernels of a device run on. Both are created on first use; `compute` is where ops
// run.
void* cuda_compute_stream(int device);
void* cuda_comm_stream(int device);
void* current_stream(Device device);  // nullptr on the CPU

}  // namespace hydra
