#include "kernels/reduce.h"

#include <algorithm>
#include <limits>
#include <vector>

#include "kernels/base/parallel.h"
#include "kernels/cpu/common.h"

namespace hydra::kernels::cpu {
namespace {

// Summation blocks: partial results per block, combined in block order. The blocks depend on the
// shape alone, so the result is the same on any thread count.
constexpr int64_t kFlatBlock = 4096;  // elements, when reducing a contiguous run (inner == 1)
constexpr int64_t kRowBlock = 64;     // rows, when reducing across rows (inner > 1)

template <class T>
struct Reducer {
  ReduceOp op;
  double init() const {
    switch (op) {
      case ReduceOp::kMax:
        return -std::numeric_limits<double>::infinity();
      case ReduceOp::kMin:
        return std::numeric_limits<double>::infinity();
      default:
        return 0.0;
    }
  }
  double map(T v) const { return op == ReduceOp::kSumSquares ? double(v) * double(v) : double(v); }
  double combine(double a, double b) const {
    switch (op) {
      case ReduceOp::kMax:
        return std::max(a, b);
      case ReduceOp::kMin:
        return std::min(a, b);
      default:
        return a + b;
    }
  }
};

template <class T>
void reduce_impl(const ReduceParams& p) {
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  const Reducer<T> red{p.op};
  const int64_t outer = p.outer, R = p.reduce, inner = p.inner;
  if (outer * inner == 0) return;
  if (inner == 1) {
    const int64_t nblk = std::max<int64_t>(1, (R + kFlatBlock - 1) / kFlatBlock);
    std::vector<double> part(outer * nblk);
    parallel_for(outer * nblk, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t o = t / nblk, blk = t % nblk;
        const T* row = x + o * R;
        double acc = red.init();
        for (int64_t r = blk * kFlatBlock, e = std::min(R, (blk + 1) * kFlatBlock); r < e; ++r)
          acc = red.combine(acc, red.map(row[r]));
        part[t] = acc;
      }
    });
    for (int64_t o = 0; o < outer; ++o) {
      double acc = red.init();
      for (int64_t blk = 0; blk < nblk; ++blk) acc = red.combine(acc, part[o * nblk + blk]);
      y[o] = static_cast<T>(acc * p.scale);
    }
    return;
  }
  const int64_t nblk = std::max<int64_t>(1, (R + kRowBlock - 1) / kRowBlock);
  std::vector<double> part(outer * nblk * inner);
  parallel_for(outer * nblk, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t o = t / nblk, blk = t % nblk;
      double* acc = part.data() + t * inner;
      std::fill(acc, acc + inner, red.init());
      for (int64_t r = blk * kRowBlock, e = std::min(R, (blk + 1) * kRowBlock); r < e; ++r) {
        const T* row = x + (o * R + r) * inner;
        for (int64_t i = 0; i < inner; ++i) acc[i] = red.combine(acc[i], red.map(row[i]));
      }
    }
  });
  parallel_for(outer, 1, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      for (int64_t i = 0; i < inner; ++i) {
        double acc = red.init();
        for (int64_t blk = 0; blk < nblk; ++blk)
          acc = red.combine(acc, part[(o * nblk + blk) * inner + i]);
        y[o * inner + i] = static_cast<T>(acc * p.scale);
      }
    }
  });
}

}  // namespace

void multi_sum_squares(const MultiSumSquaresParams& p) {
  double total = 0;
  for (int i = 0; i < p.count; ++i) {
    dispatch_float(p.dtype, "multi_sum_squares", [&](auto tag) {
      using T = typename decltype(tag)::type;
      double r = 0;
      ReduceParams q;
      q.op = ReduceOp::kSumSquares;
      q.dtype = p.dtype;
      q.x = p.x[i];
      T out;
      q.y = &out;
      q.reduce = p.n[i];
      if (p.n[i] > 0) {
        reduce_impl<T>(q);
        r = static_cast<double>(out);
      }
      total += r;
    });
  }
  if (p.add_to != nullptr) {
    *p.add_to += total;
  } else {
    *p.out = total;
  }
}

void reduce_axis(const ReduceParams& p) {
  dispatch_float(p.dtype, "reduce",
                 [&](auto tag) { reduce_impl<typename decltype(tag)::type>(p); });
}

}  // namespace hydra::kernels::cpu
