#include <sys/mman.h>

#include <algorithm>
#include <cstring>
#include <system_error>
#include <thread>
#include <vector>

#include "kernels/cuda/check.cuh"
#include "kernels/device_runtime.h"

namespace hydra::kernels::cuda {

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // no driver or no device: report none, leave no sticky error
    return 0;
  }
  return n;
}

void set_device(int device) { HYDRA_CUDA_CHECK(cudaSetDevice(device)); }

int current_device() {
  int d = 0;
  HYDRA_CUDA_CHECK(cudaGetDevice(&d));
  return d;
}

std::string device_name(int device) {
  cudaDeviceProp prop{};
  HYDRA_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  return prop.name;
}

std::size_t device_total_memory(int device) {
  cudaDeviceProp prop{};
  HYDRA_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  return prop.totalGlobalMem;
}

void* device_malloc(std::size_t bytes, int device) {
  HYDRA_CUDA_CHECK(cudaSetDevice(device));
  void* p = nullptr;
  const cudaError_t err = cudaMalloc(&p, bytes);
  if (err == cudaErrorMemoryAllocation) {
    (void)cudaGetLastError();
    return nullptr;
  }
  HYDRA_CUDA_CHECK(err);
  return p;
}

void device_free(void* ptr, int device) {
  HYDRA_CUDA_CHECK(cudaSetDevice(device));
  HYDRA_CUDA_CHECK(cudaFree(ptr));
}

namespace {
// From this size up, the pages are mapped and faulted in first, with no CUDA call (so no driver
// lock another thread's launches would wait on), and only then page-locked by cudaHostRegister,
// which then has nothing to allocate: about 0.03 s a GB instead of 0.36 s a GB of the driver's
// time, during which every other thread's CUDA calls wait (H200 host, 2026-12-03,
// hydra-bench-pinned). MAP_POPULATE would hold the process's memory map for the whole mapping;
// instead one byte a page is written (the kernel zeroes the page it maps) by a few threads at once,
// each its own range; huge pages where the kernel gives them. A checkpoint's staging buffers (GBs,
// one mapping) are set up this way on a background thread (docs/RELIABILITY.md).
constexpr std::size_t kTouchFirst = kPinnedTouchFirstBytes;

void touch_pages(char* p, std::size_t bytes) {
  constexpr std::size_t kPage = 4096, kPerThread = std::size_t{1} << 30;
  // At most 4 threads, and a quarter of the cores (ranks may share the host): a GB each at least.
  const std::size_t cores = std::max(1u, std::thread::hardware_concurrency() / 4);
  const std::size_t threads =
      std::clamp<std::size_t>(bytes / kPerThread, 1, std::min<std::size_t>(4, cores));
  const std::size_t share = (bytes / threads + kPage - 1) / kPage * kPage;
  auto touch = [p, bytes](std::size_t from, std::size_t to) {
    for (std::size_t at = from; at < std::min(to, bytes); at += kPage)
      *static_cast<volatile char*>(p + at) = 0;
  };
  std::vector<std::thread> helpers;
  helpers.reserve(threads - 1);
  std::size_t started = 1;
  try {
    for (; started < threads; ++started)
      helpers.emplace_back(touch, started * share, (started + 1) * share);
  } catch (const std::system_error&) {  // no thread to be had: this one touches the rest too
  }
  touch(0, share);
  touch(started * share, bytes);
  for (std::thread& h : helpers) h.join();
}
}  // namespace

void* host_malloc_pinned(std::size_t bytes) {
  if (bytes < kTouchFirst) {
    void* p = nullptr;
    HYDRA_CUDA_CHECK(cudaMallocHost(&p, bytes));
    return p;
  }
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  HYDRA_CHECK(p != MAP_FAILED) << "out of host memory: " << bytes << " bytes of page-locked memory";
  madvise(p, bytes, MADV_HUGEPAGE);  // advice: ignored where not supported
  touch_pages(static_cast<char*>(p), bytes);
  const cudaError_t err = cudaHostRegister(p, bytes, cudaHostRegisterDefault);
  if (err != cudaSuccess) munmap(p, bytes);
  HYDRA_CUDA_CHECK(err);
  return p;
}

void host_free_pinned(void* ptr, std::size_t bytes) {
  if (bytes < kTouchFirst) {
    HYDRA_CUDA_CHECK(cudaFreeHost(ptr));
    return;
  }
  HYDRA_CUDA_CHECK(cudaHostUnregister(ptr));
  munmap(ptr, bytes);
}

void memcpy_async(void* dst, const void* src, std::size_t bytes, CopyKind kind, void* stream) {
  if (bytes == 0) return;
  const cudaMemcpyKind k = kind == CopyKind::kHostToDevice   ? cudaMemcpyHostToDevice
                           : kind == CopyKind::kDeviceToHost ? cudaMemcpyDeviceToHost
                                                             : cudaMemcpyDeviceToDevice;
  HYDRA_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, k, as_stream(stream)));
}

void memset_async(void* dst, int value, std::size_t bytes, void* stream) {
  if (bytes == 0) return;
  HYDRA_CUDA_CHECK(cudaMemsetAsync(dst, value, bytes, as_stream(stream)));
}

void* stream_create(int device) {
  HYDRA_CUDA_CHECK(cudaSetDevice(device));
  cudaStream_t s = nullptr;
  HYDRA_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  return s;
}

void stream_destroy(void* stream) { HYDRA_CUDA_CHECK(cudaStreamDestroy(as_stream(stream))); }
void stream_synchronize(void* stream) {
  HYDRA_CUDA_CHECK(cudaStreamSynchronize(as_stream(stream)));
}

void device_synchronize(int device) {
  HYDRA_CUDA_CHECK(cudaSetDevice(device));
  HYDRA_CUDA_CHECK(cudaDeviceSynchronize());
}

void* event_create() {
  cudaEvent_t e = nullptr;
  HYDRA_CUDA_CHECK(cudaEventCreate(&e));
  return e;
}

void event_destroy(void* event) {
  HYDRA_CUDA_CHECK(cudaEventDestroy(static_cast<cudaEvent_t>(event)));
}

void event_record(void* event, void* stream) {
  HYDRA_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(event), as_stream(stream)));
}

void stream_wait_event(void* stream, void* event) {
  HYDRA_CUDA_CHECK(cudaStreamWaitEvent(as_stream(stream), static_cast<cudaEvent_t>(event), 0));
}

namespace {
__global__ void hold_kernel(long long ns) {
  const long long end =
      static_cast<long long>(clock64()) + ns * 2;  // clocks run at 1-2 GHz: at least ns
  while (static_cast<long long>(clock64()) < end) __nanosleep(1000);
}
}  // namespace

void stream_hold(void* stream, double microseconds) {
  hold_kernel<<<1, 1, 0, as_stream(stream)>>>(static_cast<long long>(microseconds * 1000));
  HYDRA_CUDA_LAUNCH_CHECK();
}

bool event_query(void* event) {
  const cudaError_t err = cudaEventQuery(static_cast<cudaEvent_t>(event));
  if (err == cudaErrorNotReady) {
    (void)cudaGetLastError();
    return false;
  }
  HYDRA_CUDA_CHECK(err);
  return true;
}

void event_synchronize(void* event) {
  HYDRA_CUDA_CHECK(cudaEventSynchronize(static_cast<cudaEvent_t>(event)));
}

float event_elapsed_ms(void* start, void* end) {
  float ms = 0;
  HYDRA_CUDA_CHECK(
      cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(start), static_cast<cudaEvent_t>(end)));
  return ms;
}

}  // namespace hydra::kernels::cuda
