#include "kernels/gated_update.h"

#include <algorithm>
#include <cmath>

#include "kernels/base/parallel.h"
#include "kernels/cpu/common.h"

namespace hydra::kernels::cpu {
namespace {

// The gate's gradients: gw = [sum_r dz[r] s[r], sum_r dz[r] u[r]], gb = sum_r dz[r], over `rows`
// rows of n (either output may be null; sums in row order).
template <class T>
void gate_grads(const T* s, const T* u, const T* gz, int64_t rows, int64_t n, T* gw, T* gb) {
  if (gw != nullptr) {
    parallel_for(2 * n, 64, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const T* x = c < n ? s + c : u + (c - n);
        T acc = 0;
        for (int64_t r = 0; r < rows; ++r) acc += gz[r] * x[r * n];
        gw[c] = acc;
      }
    });
  }
  if (gb != nullptr) {
    T acc = 0;
    for (int64_t r = 0; r < rows; ++r) acc += gz[r];
    *gb = acc;
  }
}

template <class T>
void fwd_impl(const GatedUpdateParams& p) {
  const T *s = static_cast<const T*>(p.s), *u = static_cast<const T*>(p.u),
          *w = static_cast<const T*>(p.w);
  const T b = *static_cast<const T*>(p.b);
  T *out = static_cast<T*>(p.out), *gate = static_cast<T*>(p.gate);
  const int64_t n = p.cols;
  parallel_for(p.rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T *sr = s + r * n, *ur = u + r * n;
      T z = 0;
      for (int64_t c = 0; c < n; ++c) z += sr[c] * w[c] + ur[c] * w[n + c];
      const T g = sigmoid(z + b);
      gate[r] = g;
      for (int64_t c = 0; c < n; ++c) out[r * n + c] = sr[c] + g * (ur[c] - sr[c]);
    }
  });
}

template <class T>
void bwd_impl(const GatedUpdateBwdParams& q) {
  const GatedUpdateParams& p = q.fwd;
  const T *s = static_cast<const T*>(p.s), *u = static_cast<const T*>(p.u),
          *w = static_cast<const T*>(p.w);
  const T *gate = static_cast<const T*>(p.gate), *gout = static_cast<const T*>(q.gout);
  T *gs = static_cast<T*>(q.gs), *gu = static_cast<T*>(q.gu), *gz = static_cast<T*>(q.gz);
  const int64_t n = p.cols;
  parallel_for(p.rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T *sr = s + r * n, *ur = u + r * n, *go = gout + r * n;
      T dot = 0;
      for (int64_t c = 0; c < n; ++c) dot += go[c] * (ur[c] - sr[c]);
      const T g = gate[r], dz = g * (T(1) - g) * dot;
      gz[r] = dz;
      for (int64_t c = 0; c < n; ++c) {
        gs[r * n + c] = (T(1) - g) * go[c] + dz * w[c];
        gu[r * n + c] = g * go[c] + dz * w[n + c];
      }
    }
  });
  gate_grads(s, u, gz, p.rows, n, static_cast<T*>(q.gw), static_cast<T*>(q.gb));
}

template <class T>
void scan_fwd_impl(const GatedScanParams& p) {
  const int64_t R = p.rows, n = p.cols, len = R * n;
  const T *u = static_cast<const T*>(p.u), *w = static_cast<const T*>(p.w);
  const T b = *static_cast<const T*>(p.b);
  T *h = static_cast<T*>(p.h), *gate = static_cast<T*>(p.gate);
  std::copy_n(static_cast<const T*>(p.s), len, h);
  parallel_for(R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t t = 0; t < p.steps; ++t)
      for (int64_t r = r0; r < r1; ++r) {
        const T *hr = h + t * len + r * n, *ur = u + t * len + r * n;
        T z = 0;
        for (int64_t c = 0; c < n; ++c) z += hr[c] * w[c] + ur[c] * w[n + c];
        const T g = sigmoid(z + b);
        gate[t * R + r] = g;
        T* out = h + (t + 1) * len + r * n;
        for (int64_t c = 0; c < n; ++c) out[c] = hr[c] + g * (ur[c] - hr[c]);
      }
  });
}

template <class T>
void scan_bwd_impl(const GatedScanBwdParams& q) {
  const GatedScanParams& p = q.fwd;
  const int64_t R = p.rows, n = p.cols, len = R * n;
  const T *u = static_cast<const T*>(p.u), *w = static_cast<const T*>(p.w),
          *h = static_cast<const T*>(p.h);
  const T *gate = static_cast<const T*>(p.gate), *gh = static_cast<const T*>(q.gh);
  T *gu = static_cast<T*>(q.gu), *lam = static_cast<T*>(q.lambda), *gz = static_cast<T*>(q.gz);
  std::copy_n(gh + p.steps * len, len, lam);
  parallel_for(R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t t = p.steps - 1; t >= 0; --t)
      for (int64_t r = r0; r < r1; ++r) {
        const T *hr = h + t * len + r * n, *ur = u + t * len + r * n, *gr = gh + t * len + r * n;
        T* lr = lam + r * n;
        T dot = 0;
        for (int64_t c = 0; c < n; ++c) dot += lr[c] * (ur[c] - hr[c]);
        const T g = gate[t * R + r], dz = g * (T(1) - g) * dot;
        gz[t * R + r] = dz;
        T* gur = gu + t * len + r * n;
        for (int64_t c = 0; c < n; ++c) {
          gur[c] = g * lr[c] + dz * w[n + c];
          lr[c] = gr[c] + (T(1) - g) * lr[c] + dz * w[c];
        }
      }
  });
  std::copy_n(lam, len, static_cast<T*>(q.gs));
  // The gate's sums run over every (step, row): h_t for s, u_t for u.
  gate_grads(h, u, gz, p.steps * R, n, static_cast<T*>(q.gw), static_cast<T*>(q.gb));
}

}  // namespace

void gated_scan_fwd(const GatedScanParams& p) {
  dispatch_float(p.dtype, "gated_scan",
                 [&](auto tag) { scan_fwd_impl<typename decltype(tag)::type>(p); });
}

void gated_scan_bwd(const GatedScanBwdParams& p) {
  dispatch_float(p.fwd.dtype, "gated_scan_backward",
                 [&](auto tag) { scan_bwd_impl<typename decltype(tag)::type>(p); });
}

void gated_update_fwd(const GatedUpdateParams& p) {
  dispatch_float(p.dtype, "gated_update",
                 [&](auto tag) { fwd_impl<typename decltype(tag)::type>(p); });
}

void gated_update_bwd(const GatedUpdateBwdParams& p) {
  dispatch_float(p.fwd.dtype, "gated_update_backward",
                 [&](auto tag) { bwd_impl<typename decltype(tag)::type>(p); });
}

}  // namespace hydra::kernels::cpu
