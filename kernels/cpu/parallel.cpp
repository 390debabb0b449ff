#include "kernels/base/parallel.h"

#include <cblas.h>

#include <atomic>
#include <cstdlib>
#include <string>

namespace hydra {
namespace {

int threads_from_env() {
  for (const char* name : {"HYDRA_NUM_THREADS", "OMP_NUM_THREADS"}) {
    if (const char* v = std::getenv(name)) {
      char* end = nullptr;
      const long n = std::strtol(v, &end, 10);
      if (end != v && n > 0) return static_cast<int>(n);
    }
  }
  return omp_get_num_procs();
}

std::atomic<int>& thread_setting() {
  static std::atomic<int> threads{[] {
    // BLAS runs single-threaded inside the kernels' own thread-count-independent partition
    // (cpu/matmul.cpp).
    openblas_set_num_threads(1);
    return threads_from_env();
  }()};
  return threads;
}

}  // namespace

int num_threads() { return thread_setting().load(std::memory_order_relaxed); }

void set_num_threads(int n) {
  n = n > 0 ? n : 1;
  thread_setting().store(n, std::memory_order_relaxed);
}

}  // namespace hydra
