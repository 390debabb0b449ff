#include "kernels/conv1d.h"

#include <algorithm>
#include <vector>

#include "kernels/base/parallel.h"
#include "kernels/cpu/common.h"

namespace hydra::kernels::cpu {
namespace {

constexpr int64_t kChannelChunk = 16;

// x at time s (which may be negative: then the prefix, or zero).
template <class T>
struct ConvInput {
  const T* x;
  const T* prefix;
  int64_t len, channels, width;
  T at(int64_t b, int64_t s, int64_t c) const {
    if (s >= 0) return x[(b * len + s) * channels + c];
    if (!prefix) return T(0);
    return prefix[(b * (width - 1) + (width - 1 + s)) * channels + c];
  }
};

template <class T>
T pre_activation(const ConvInput<T>& in, const T* w, const T* bias, int64_t b, int64_t t,
                 int64_t c) {
  T acc = bias ? bias[c] : T(0);
  for (int64_t k = 0; k < in.width; ++k)
    acc += w[c * in.width + k] * in.at(b, t - (in.width - 1) + k, c);
  return acc;
}

}  // namespace

void causal_conv1d_fwd(const CausalConv1dParams& p) {
  dispatch_float(p.dtype, "causal_conv1d", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const ConvInput<T> in{static_cast<const T*>(p.x), static_cast<const T*>(p.prefix), p.len,
                          p.channels, p.width};
    const T* w = static_cast<const T*>(p.w);
    const T* bias = static_cast<const T*>(p.bias);
    T* y = static_cast<T*>(p.y);
    parallel_for(p.batch * p.len, grain_for(p.channels * p.width), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / p.len, t = r % p.len;
        for (int64_t c = 0; c < p.channels; ++c) {
          const T v = pre_activation(in, w, bias, b, t, c);
          y[r * p.channels + c] = p.silu ? v * sigmoid(v) : v;
        }
      }
    });
  });
}

// Tasks own channel ranges, so the weight and bias sums run in a fixed order per channel.
void causal_conv1d_bwd(const CausalConv1dBwdParams& p) {
  dispatch_float(p.dtype, "causal_conv1d_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const ConvInput<T> in{static_cast<const T*>(p.x), static_cast<const T*>(p.prefix), p.len,
                          p.channels, p.width};
    const T* w = static_cast<const T*>(p.w);
    const T* bias = static_cast<const T*>(p.bias);
    const T* gy = static_cast<const T*>(p.gy);
    T* gx = static_cast<T*>(p.gx);
    T* gw = static_cast<T*>(p.gw);
    T* gbias = static_cast<T*>(p.gbias);
    T* gprefix = static_cast<T*>(p.gprefix);
    const int64_t W = p.width, L = p.len, C = p.channels;
    const int64_t chunks = (C + kChannelChunk - 1) / kChannelChunk;
    parallel_for(chunks, 1, [&](int64_t k0, int64_t k1) {
      std::vector<T> gpre(L);
      for (int64_t chunk = k0; chunk < k1; ++chunk) {
        for (int64_t c = chunk * kChannelChunk, ce = std::min(C, (chunk + 1) * kChannelChunk);
             c < ce; ++c) {
          std::vector<double> gw_acc(W, 0.0);
          double gb_acc = 0;
          for (int64_t b = 0; b < p.batch; ++b) {
            for (int64_t t = 0; t < L; ++t) {
              T g = gy[(b * L + t) * C + c];
              if (p.silu) {
                const T v = pre_activation(in, w, bias, b, t, c);
                const T s = sigmoid(v);
                g *= s * (T(1) + v * (T(1) - s));
              }
              gpre[t] = g;
              gb_acc += g;
              for (int64_t k = 0; k < W; ++k)
                gw_acc[k] += double(g) * double(in.at(b, t - (W - 1) + k, c));
            }
            // x at time s feeds outputs t = s .. s+W-1 through tap k = s - t + W - 1.
            for (int64_t s = -(W - 1); s < L; ++s) {
              if (s < 0 && !gprefix) continue;
              T acc = 0;
              for (int64_t t = std::max<int64_t>(s, 0); t <= std::min(L - 1, s + W - 1); ++t)
                acc += w[c * W + (s - t + W - 1)] * gpre[t];
              if (s >= 0) {
                gx[(b * L + s) * C + c] = acc;
              } else {
                gprefix[(b * (W - 1) + (W - 1 + s)) * C + c] = acc;
              }
            }
          }
          for (int64_t k = 0; k < W; ++k) gw[c * W + k] = static_cast<T>(gw_acc[k]);
          if (gbias) gbias[c] = static_cast<T>(gb_acc);
        }
      }
    });
  });
}

}  // namespace hydra::kernels::cpu
