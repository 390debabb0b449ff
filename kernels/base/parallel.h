// CPU threading. Work is cut into chunks whose boundaries depend only on the problem size and the
// grain, never on the thread count, so every kernel gives bit-identical results with 1 or N
// threads.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>

namespace hydra {

// Threads used by CPU kernels and BLAS: HYDRA_NUM_THREADS, else OMP_NUM_THREADS, else all cores.
int num_threads();
void set_num_threads(int n);

// Calls fn(begin, end) for each chunk [c*grain, min(n, (c+1)*grain)) of [0, n), in parallel.
template <class F>
void parallel_for(int64_t n, int64_t grain, F&& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t chunks = (n + grain - 1) / grain;
  const int threads = static_cast<int>(std::min<int64_t>(num_threads(), chunks));
  if (threads <= 1 || omp_in_parallel()) {
    for (int64_t c = 0; c < chunks; ++c) fn(c * grain, std::min(n, (c + 1) * grain));
    return;
  }
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t c = 0; c < chunks; ++c) fn(c * grain, std::min(n, (c + 1) * grain));
}

// A grain that gives each chunk about `work_per_chunk` units when one item costs `cost_per_item`.
inline int64_t grain_for(int64_t cost_per_item, int64_t work_per_chunk = 32768) {
  return std::max<int64_t>(1, work_per_chunk / std::max<int64_t>(cost_per_item, 1));
}

}  // namespace hydra
