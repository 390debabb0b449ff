// The CUDA runtime as the rest of the engine sees it: plain C++ signatures (streams are void*),
// defined in kernels/cuda/runtime.cu. Only available when built with HYDRA_CUDA
// (HYDRA_WITH_CUDA=1).
#pragma once

#include <cstddef>
#include <string>

namespace hydra::kernels::cuda {

int device_count();  // 0 when no driver or no device
void set_device(int device);
int current_device();
std::string device_name(int device);
std::size_t device_total_memory(int device);  // bytes

void* device_malloc(std::size_t bytes, int device);  // nullptr when the device is out of memory
void device_free(void* ptr, int device);
// From this size up, page-locked blocks are mapped, touched and then registered (runtime.cu: no
// driver allocation holding other threads' CUDA calls); smaller ones come from cudaMallocHost.
constexpr std::size_t kPinnedTouchFirstBytes = std::size_t{64} << 20;
void* host_malloc_pinned(std::size_t bytes);
void host_free_pinned(void* ptr, std::size_t bytes);  // bytes: as allocated

enum class CopyKind { kHostToDevice, kDeviceToHost, kDeviceToDevice };
void memcpy_async(void* dst, const void* src, std::size_t bytes, CopyKind kind, void* stream);
void memset_async(void* dst, int value, std::size_t bytes, void* stream);

void* stream_create(int device);  // non-blocking stream
void stream_destroy(void* stream);
void stream_synchronize(void* stream);
void device_synchronize(int device);

void* event_create();
void event_destroy(void* event);
void event_record(void* event, void* stream);
void stream_wait_event(void* stream, void* event);
bool event_query(void* event);  // true when complete
void event_synchronize(void* event);
float event_elapsed_ms(void* start, void* end);

// Keeps `stream` busy for about `microseconds` (one thread spinning on the clock). A benchmark
// enqueues it before its start event so that the host has queued the timed work by the time the
// event fires: the interval then measures the device, not the host's launch overhead.
void stream_hold(void* stream, double microseconds);

}  // namespace hydra::kernels::cuda
