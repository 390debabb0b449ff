#include "kernels/moe_combine.h"

#include <vector>

#include "kernels/cpu/common.h"

namespace hydra::kernels::cpu {
namespace {

template <class T>
double weight_of(const MoeCombineParams& p, int64_t row) {
  const int64_t pair = p.widx[row];
  return pair >= 0 && pair < p.pairs ? double(static_cast<const T*>(p.w)[pair]) : 0.0;
}

template <class T>
void fwd_impl(const MoeCombineParams& p) {
  const T* y = static_cast<const T*>(p.y);
  T* out = static_cast<T*>(p.out);
  std::vector<double> acc(p.cols);
  for (int64_t t = 0; t < p.tokens; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0);
    for (int64_t k = 0; k < p.K; ++k) {
      const int64_t i = p.inverse[t * p.K + k];
      if (i < 0) continue;
      const double wi = weight_of<T>(p, i);
      for (int64_t c = 0; c < p.cols; ++c) acc[c] += wi * double(y[i * p.cols + c]);
    }
    for (int64_t c = 0; c < p.cols; ++c) out[t * p.cols + c] = static_cast<T>(acc[c]);
  }
}

// The reference walks the dispatch rows in order: a pair's rows are its chunk's tokens ascending,
// the order the CUDA kernel sums them in.
template <class T>
void bwd_impl(const MoeCombineBwdParams& q) {
  const MoeCombineParams& p = q.fwd;
  const T* y = static_cast<const T*>(p.y);
  const T* gout = static_cast<const T*>(q.gout);
  T* gy = static_cast<T*>(q.gy);
  // The rows some token names (the others are padding, or dropped past the kept prefix).
  std::vector<char> named(p.rows, 0);
  for (int64_t e = 0; e < p.tokens * p.K; ++e)
    if (p.inverse[e] >= 0 && p.inverse[e] < p.rows) named[p.inverse[e]] = 1;
  std::vector<double> gw(p.pairs, 0.0);
  for (int64_t i = 0; i < p.rows; ++i) {
    const bool live = named[i] != 0;
    const int64_t t = q.perm[i], pair = p.widx[i];
    const double wi = live ? weight_of<T>(p, i) : 0.0;
    double dot = 0;
    for (int64_t c = 0; c < p.cols; ++c) {
      const double g = live ? double(gout[t * p.cols + c]) : 0.0;
      if (gy) gy[i * p.cols + c] = static_cast<T>(wi * g);
      dot += g * double(y[i * p.cols + c]);
    }
    if (live && pair >= 0 && pair < p.pairs) gw[pair] += dot;
  }
  if (q.gw) {
    T* gwo = static_cast<T*>(q.gw);
    for (int64_t e = 0; e < p.pairs; ++e) gwo[e] = static_cast<T>(gw[e]);
  }
}

}  // namespace

void moe_combine_fwd(const MoeCombineParams& p) {
  dispatch_float(p.dtype, "moe_combine",
                 [&](auto tag) { fwd_impl<typename decltype(tag)::type>(p); });
}

void moe_combine_bwd(const MoeCombineBwdParams& q) {
  dispatch_float(q.fwd.dtype, "moe_combine_backward",
                 [&](auto tag) { bwd_impl<typename decltype(tag)::type>(q); });
}

}  // namespace hydra::kernels::cpu
