// CPU causal depthwise conv1d. Channels are innermost in memory, so every loop runs over channels
// (vectorised); the weight is transposed to [W, C] once per call. Weight and bias gradients are
// summed in fixed blocks of rows combined in order (thread-count independent).
#include "kernels/conv1d.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/base/parallel.h"
#include "kernels/cpu/common.h"

namespace hydra::kernels::cpu {
namespace {

constexpr int64_t kRowBlock = 64;

template <class T>
struct Conv {
  const T* x;
  const T* prefix;
  int64_t batch, len, channels, width, x_row;
  // Row of inputs at time s of sequence b (s < 0: the prefix, or null for zeros).
  const T* row(int64_t b, int64_t s) const {
    if (s >= 0) return x + (b * len + s) * x_row;
    if (!prefix) return nullptr;
    return prefix + (b * (width - 1) + (width - 1 + s)) * channels;
  }
};

// The input's view of either direction's parameters.
template <class T, class P>
Conv<T> conv_of(const P& p) {
  return {static_cast<const T*>(p.x),
          static_cast<const T*>(p.prefix),
          p.batch,
          p.len,
          p.channels,
          p.width,
          conv_x_row(p)};
}

template <class T>
std::vector<T> transpose_weight(const T* w, int64_t C, int64_t W) {
  std::vector<T> wt(W * C);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t k = 0; k < W; ++k) wt[k * C + c] = w[c * W + k];
  return wt;
}

// pre[c] = bias[c] + sum_k wt[k][c] * x(t - (W-1) + k)[c]
template <class T>
void pre_activation(const Conv<T>& cv, const T* wt, const T* bias, int64_t b, int64_t t,
                    T* __restrict pre) {
  const int64_t C = cv.channels, W = cv.width;
  for (int64_t c = 0; c < C; ++c) pre[c] = bias ? bias[c] : T(0);
  for (int64_t k = 0; k < W; ++k) {
    const T* __restrict src = cv.row(b, t - (W - 1) + k);
    if (!src) continue;
    const T* __restrict wk = wt + k * C;
    for (int64_t c = 0; c < C; ++c) pre[c] += wk[c] * src[c];
  }
}

}  // namespace

void causal_conv1d_fwd(const CausalConv1dParams& p) {
  dispatch_float(p.dtype, "causal_conv1d", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const Conv<T> cv = conv_of<T>(p);
    const std::vector<T> wt = transpose_weight(static_cast<const T*>(p.w), p.channels, p.width);
    const T* bias = static_cast<const T*>(p.bias);
    T* y = static_cast<T*>(p.y);
    const int64_t C = p.channels;
    parallel_for(p.batch * p.len, grain_for(C * p.width), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        T* __restrict out = y + r * C;
        pre_activation(cv, wt.data(), bias, r / p.len, r % p.len, out);
        if (p.silu)
          for (int64_t c = 0; c < C; ++c) out[c] = out[c] / (T(1) + std::exp(-out[c]));
      }
    });
  });
}

void causal_conv1d_bwd(const CausalConv1dBwdParams& p) {
  dispatch_float(p.dtype, "causal_conv1d_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const Conv<T> cv = conv_of<T>(p);
    const int64_t B = p.batch, L = p.len, C = p.channels, W = p.width, rows = B * L;
    const std::vector<T> wt = transpose_weight(static_cast<const T*>(p.w), C, W);
    const T* bias = static_cast<const T*>(p.bias);
    const T* gy = static_cast<const T*>(p.gy);
    // 1. gpre = gy * dSiLU(pre), pre recomputed.
    std::vector<T> gpre(rows * C);
    parallel_for(rows, grain_for(C * W), [&](int64_t r0, int64_t r1) {
      std::vector<T> pre(C);
      for (int64_t r = r0; r < r1; ++r) {
        T* __restrict g = gpre.data() + r * C;
        const T* __restrict gr = gy + r * C;
        if (!p.silu) {
          std::copy(gr, gr + C, g);
          continue;
        }
        pre_activation(cv, wt.data(), bias, r / L, r % L, pre.data());
        for (int64_t c = 0; c < C; ++c) {
          const T s = T(1) / (T(1) + std::exp(-pre[c]));
          g[c] = gr[c] * s * (T(1) + pre[c] * (T(1) - s));
        }
      }
    });
    // 2. Input (and prefix) gradients: x at time s feeds outputs t = s..s+W-1 through tap s - t + W
    // - 1.
    T* gx = static_cast<T*>(p.gx);
    T* gprefix = static_cast<T*>(p.gprefix);
    const int64_t srows = B * (L + W - 1);  // times -(W-1) .. L-1 per sequence
    parallel_for(srows, grain_for(C * W), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / (L + W - 1), s = r % (L + W - 1) - (W - 1);
        T* __restrict dst = s >= 0
                                ? gx + (b * L + s) * C
                                : (gprefix ? gprefix + (b * (W - 1) + (W - 1 + s)) * C : nullptr);
        if (!dst) continue;
        std::fill(dst, dst + C, T(0));
        for (int64_t k = 0; k < W; ++k) {
          const int64_t t = s + (W - 1) - k;
          if (t < 0 || t >= L) continue;
          const T* __restrict g = gpre.data() + (b * L + t) * C;
          const T* __restrict wk = wt.data() + k * C;
          for (int64_t c = 0; c < C; ++c) dst[c] += wk[c] * g[c];
        }
      }
    });
    // 3. Weight and bias gradients over fixed row blocks.
    const int64_t nblk = (rows + kRowBlock - 1) / kRowBlock;
    std::vector<T> gw_part(nblk * W * C, T(0)), gb_part(nblk * C, T(0));
    parallel_for(nblk, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t blk = k0; blk < k1; ++blk) {
        T* __restrict gwp = gw_part.data() + blk * W * C;
        T* __restrict gbp = gb_part.data() + blk * C;
        for (int64_t r = blk * kRowBlock, e = std::min(rows, (blk + 1) * kRowBlock); r < e; ++r) {
          const T* __restrict g = gpre.data() + r * C;
          for (int64_t c = 0; c < C; ++c) gbp[c] += g[c];
          for (int64_t k = 0; k < W; ++k) {
            const T* __restrict src = cv.row(r / L, r % L - (W - 1) + k);
            if (!src) continue;
            T* __restrict gk = gwp + k * C;
            for (int64_t c = 0; c < C; ++c) gk[c] += g[c] * src[c];
          }
        }
      }
    });
    T* gw = static_cast<T*>(p.gw);
    T* gbias = static_cast<T*>(p.gbias);
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t k = 0; k < W; ++k) {
        T s = 0;
        for (int64_t blk = 0; blk < nblk; ++blk) s += gw_part[(blk * W + k) * C + c];
        gw[c * W + k] = s;
      }
      if (gbias) {
        T s = 0;
        for (int64_t blk = 0; blk < nblk; ++blk) s += gb_part[blk * C + c];
        gbias[c] = s;
      }
    }
  });
}

}  // namespace hydra::kernels::cpu
