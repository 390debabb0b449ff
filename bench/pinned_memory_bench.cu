// Does page-locking host memory on one thread hold up another thread's CUDA work? Thread A launches
// 1 ms kernels (a sync every 10) while thread B sets up SIZE GB of page-locked memory one way:
//   1 cudaHostAlloc of the whole; 2 cudaHostAlloc in 64 MB pieces; 3 pages touched by writes, then
//   one cudaHostRegister; 4 touched, then registered in 64 MB pieces; 5 as 4 with 5 ms pauses.
// Prints how long B took and how much A was slowed (its worst 10-kernel batch: 10 ms when not held
// up). Also: a 1 GB copy to the host into pageable memory, two registrations, and one.
// Usage: hydra-bench-pinned [SIZE_GB] (default 4). Results: docs/RELIABILITY.md.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;
double seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

__global__ void spin(long long cycles) {
  const long long t0 = clock64();
  while (clock64() - t0 < cycles) {
  }
}

void copies() {
  const size_t n = size_t{1} << 30;
  char* h = static_cast<char*>(std::aligned_alloc(4096, n));
  std::memset(h, 1, n);
  void* d = nullptr;
  cudaMalloc(&d, n);
  const auto timed = [&] {
    const auto t0 = Clock::now();
    const cudaError_t e = cudaMemcpy(h, d, n, cudaMemcpyDeviceToHost);
    return e == cudaSuccess ? 1.074 / seconds(t0, Clock::now()) : -1.0;
  };
  const double pageable = timed();
  cudaHostRegister(h, n / 2, 0);
  cudaHostRegister(h + n / 2, n / 2, 0);
  const double split = timed();
  cudaHostUnregister(h);
  cudaHostUnregister(h + n / 2);
  cudaHostRegister(h, n, 0);
  const double whole = timed();
  cudaHostUnregister(h);
  cudaFree(d);
  std::free(h);
  std::printf("1 GB to the host: pageable %.1f GB/s, across two registrations %.1f, one %.1f\n",
              pageable, split, whole);
}

}  // namespace

int main(int argc, char** argv) {
  const size_t total = size_t(std::atoi(argc > 1 ? argv[1] : "4")) << 30;
  const size_t piece = size_t{64} << 20;
  cudaFree(nullptr);
  copies();
  for (int mode = 0; mode <= 5; ++mode) {
    std::atomic<bool> done{false};
    double setup = 0, touch = 0;
    std::thread b([&] {
      const auto t0 = Clock::now();
      std::vector<void*> blocks;
      char* m = nullptr;
      if (mode == 1) {
        void* p = nullptr;
        cudaHostAlloc(&p, total, cudaHostAllocDefault);
        blocks.push_back(p);
      } else if (mode == 2) {
        for (size_t at = 0; at < total; at += piece) {
          void* p = nullptr;
          cudaHostAlloc(&p, piece, cudaHostAllocDefault);
          blocks.push_back(p);
        }
      } else if (mode >= 3) {
        m = static_cast<char*>(std::aligned_alloc(4096, total));
        std::memset(m, 0, total);
        touch = seconds(t0, Clock::now());
        if (mode == 3) {
          cudaHostRegister(m, total, cudaHostRegisterDefault);
        } else {
          for (size_t at = 0; at < total; at += piece) {
            cudaHostRegister(m + at, piece, cudaHostRegisterDefault);
            if (mode == 5) std::this_thread::sleep_for(std::chrono::milliseconds(5));
          }
        }
      }
      setup = seconds(t0, Clock::now());
      done = true;
      if (mode == 3) cudaHostUnregister(m);
      if (mode >= 4)
        for (size_t at = 0; at < total; at += piece) cudaHostUnregister(m + at);
      std::free(m);
      for (void* p : blocks) cudaFreeHost(p);
    });
    double worst = 0;
    int kernels = 0;
    const auto a0 = Clock::now();
    while (mode == 0 ? kernels < 400 : !done.load()) {
      const auto t = Clock::now();
      for (int i = 0; i < 10; ++i) spin<<<1, 1>>>(1980000);  // about 1 ms at 1.98 GHz
      cudaDeviceSynchronize();
      worst = std::max(worst, seconds(t, Clock::now()));
      kernels += 10;
    }
    const double a = seconds(a0, Clock::now());
    b.join();
    std::printf(
        "mode %d: set-up %.2f s (touching %.2f s); A: %d kernels, %.3f ms each, worst batch %.1f "
        "ms\n",
        mode, setup, touch, kernels, 1e3 * a / kernels, 1e3 * worst);
    std::fflush(stdout);
  }
  return 0;
}
