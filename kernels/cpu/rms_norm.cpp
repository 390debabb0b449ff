#include "kernels/rms_norm.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/base/parallel.h"
#include "kernels/cpu/common.h"

namespace hydra::kernels::cpu {
namespace {

constexpr int64_t kRowBlock = 64;  // rows per partial sum of gw (fixed: thread-count independent)

template <class T>
void rms_norm_fwd_impl(const RmsNormParams& p) {
  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.w);
  T* y = static_cast<T*>(p.y);
  T* rstd = static_cast<T*>(p.rstd);
  const int64_t cols = p.cols;
  parallel_for(p.rows, grain_for(cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * cols;
      double ss = 0;
      for (int64_t j = 0; j < cols; ++j) ss += double(xr[j]) * double(xr[j]);
      const T rs = static_cast<T>(1.0 / std::sqrt(ss / double(cols) + p.eps));
      if (rstd) rstd[r] = rs;
      T* yr = y + r * cols;
      for (int64_t j = 0; j < cols; ++j) yr[j] = xr[j] * rs * (w ? w[j] : T(1));
    }
  });
}

template <class T>
void rms_norm_bwd_impl(const RmsNormBwdParams& p) {
  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.w);
  const T* rstd = static_cast<const T*>(p.rstd);
  const T* gy = static_cast<const T*>(p.gy);
  T* gx = static_cast<T*>(p.gx);
  const int64_t rows = p.rows, cols = p.cols;
  const int64_t nblk = std::max<int64_t>(1, (rows + kRowBlock - 1) / kRowBlock);
  std::vector<double> gw_part(p.gw ? nblk * cols : 0, 0.0);
  parallel_for(nblk, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      double* gwp = p.gw ? gw_part.data() + blk * cols : nullptr;
      for (int64_t r = blk * kRowBlock, e = std::min(rows, (blk + 1) * kRowBlock); r < e; ++r) {
        const T* xr = x + r * cols;
        const T* gr = gy + r * cols;
        const double rs = rstd[r];
        double dot = 0;  // sum_j gy*w*x
        for (int64_t j = 0; j < cols; ++j)
          dot += double(gr[j]) * (w ? double(w[j]) : 1.0) * double(xr[j]);
        const double c = rs * rs * dot / double(cols);
        T* gxr = gx + r * cols;
        for (int64_t j = 0; j < cols; ++j) {
          const double gw_j = double(gr[j]) * (w ? double(w[j]) : 1.0);
          gxr[j] = static_cast<T>(rs * (gw_j - double(xr[j]) * c));
          if (gwp) gwp[j] += double(gr[j]) * double(xr[j]) * rs;
        }
      }
    }
  });
  if (p.gw) {
    T* gw = static_cast<T*>(p.gw);
    for (int64_t j = 0; j < cols; ++j) {
      double acc = 0;
      for (int64_t blk = 0; blk < nblk; ++blk) acc += gw_part[blk * cols + j];
      gw[j] = static_cast<T>(acc);
    }
  }
}

template <class T>
void rms_norm_multi_fwd_impl(const RmsNormMultiParams& p) {
  const T* x = static_cast<const T*>(p.x);
  T* rstd = static_cast<T*>(p.rstd);
  const int64_t cols = p.cols;
  parallel_for(p.rows, grain_for(cols * p.count), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * cols;
      double ss = 0;
      for (int64_t j = 0; j < cols; ++j) ss += double(xr[j]) * double(xr[j]);
      const T rs = static_cast<T>(1.0 / std::sqrt(ss / double(cols) + p.eps));
      if (rstd) rstd[r] = rs;
      for (int k = 0; k < p.count; ++k) {
        const T* w = static_cast<const T*>(p.w[k]);
        T* yr = static_cast<T*>(p.y[k]) + r * cols;
        for (int64_t j = 0; j < cols; ++j) yr[j] = xr[j] * rs * w[j];  // as rms_norm_fwd
      }
    }
  });
}

template <class T>
void rms_norm_multi_bwd_impl(const RmsNormMultiBwdParams& p) {
  const T* x = static_cast<const T*>(p.x);
  const T* rstd = static_cast<const T*>(p.rstd);
  T* gx = static_cast<T*>(p.gx);
  const int64_t rows = p.rows, cols = p.cols, K = p.count;
  const int64_t nblk = std::max<int64_t>(1, (rows + kRowBlock - 1) / kRowBlock);
  std::vector<double> gw_part(nblk * K * cols, 0.0);
  parallel_for(nblk, 1, [&](int64_t b0, int64_t b1) {
    std::vector<double> a(cols);
    for (int64_t blk = b0; blk < b1; ++blk) {
      double* gwp = gw_part.data() + blk * K * cols;
      for (int64_t r = blk * kRowBlock, e = std::min(rows, (blk + 1) * kRowBlock); r < e; ++r) {
        const T* xr = x + r * cols;
        const double rs = rstd[r];
        std::fill(a.begin(), a.end(), 0.0);
        for (int64_t k = 0; k < K; ++k) {
          if (!p.gy[k]) continue;
          const T* gr = static_cast<const T*>(p.gy[k]) + r * cols;
          const T* w = static_cast<const T*>(p.w[k]);
          for (int64_t j = 0; j < cols; ++j) {
            a[j] += double(gr[j]) * double(w[j]);
            gwp[k * cols + j] += double(gr[j]) * double(xr[j]) * rs;
          }
        }
        double dot = 0;  // sum_j a*x
        for (int64_t j = 0; j < cols; ++j) dot += a[j] * double(xr[j]);
        const double c = rs * rs * dot / double(cols);
        T* gxr = gx + r * cols;
        for (int64_t j = 0; j < cols; ++j)
          gxr[j] = static_cast<T>(rs * (a[j] - double(xr[j]) * c) +
                                  (p.accumulate_gx ? double(gxr[j]) : 0.0));
      }
    }
  });
  for (int64_t k = 0; k < K; ++k) {
    if (!p.gw[k]) continue;
    T* gw = static_cast<T*>(p.gw[k]);
    for (int64_t j = 0; j < cols; ++j) {
      double acc = 0;
      for (int64_t blk = 0; blk < nblk; ++blk) acc += gw_part[(blk * K + k) * cols + j];
      gw[j] = static_cast<T>(acc);
    }
  }
}

}  // namespace

void rms_norm_multi_fwd(const RmsNormMultiParams& p) {
  dispatch_float(p.dtype, "rms_norm_multi",
                 [&](auto tag) { rms_norm_multi_fwd_impl<typename decltype(tag)::type>(p); });
}

void rms_norm_multi_bwd(const RmsNormMultiBwdParams& p) {
  dispatch_float(p.dtype, "rms_norm_multi_backward",
                 [&](auto tag) { rms_norm_multi_bwd_impl<typename decltype(tag)::type>(p); });
}

void rms_norm_fwd(const RmsNormParams& p) {
  dispatch_float(p.dtype, "rms_norm",
                 [&](auto tag) { rms_norm_fwd_impl<typename decltype(tag)::type>(p); });
}

void rms_norm_bwd(const RmsNormBwdParams& p) {
  dispatch_float(p.dtype, "rms_norm_backward",
                 [&](auto tag) { rms_norm_bwd_impl<typename decltype(tag)::type>(p); });
}

}  // namespace hydra::kernels::cpu
