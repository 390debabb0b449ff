#include "kernels/gated_residual.h"

#include <algorithm>
#include <vector>

#include "kernels/base/parallel.h"
#include "kernels/cpu/common.h"

namespace hydra::kernels::cpu {

void gated_residual_fwd(const GatedResidualParams& p) {
  dispatch_float(p.dtype, "gated_residual", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* x = static_cast<const T*>(p.x);
    const T* mix = static_cast<const T*>(p.mix);
    T* y = static_cast<T*>(p.y);
    parallel_for(p.rows, grain_for(p.cols * (p.paths + 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = 0; c < p.cols; ++c) {
          const int64_t e = r * p.cols + c;
          double acc = x[e];
          for (int i = 0; i < p.paths; ++i) {
            const double m = mix != nullptr ? double(mix[r * p.paths + i]) : 1.0;
            acc += double(static_cast<const T*>(p.outs[i])[e]) *
                   double(static_cast<const T*>(p.gates[i])[c]) * m;
          }
          y[e] = static_cast<T>(acc);
        }
    });
  });
}

void gated_residual_bwd(const GatedResidualBwdParams& p) {
  const GatedResidualParams& f = p.fwd;
  dispatch_float(f.dtype, "gated_residual", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* gy = static_cast<const T*>(p.gy);
    const T* mix = static_cast<const T*>(f.mix);
    auto out = [&](int i, int64_t e) { return double(static_cast<const T*>(f.outs[i])[e]); };
    auto gate = [&](int i, int64_t c) { return double(static_cast<const T*>(f.gates[i])[c]); };
    auto m = [&](int i, int64_t r) { return mix != nullptr ? double(mix[r * f.paths + i]) : 1.0; };
    // Blocks of kRows rows in parallel: the path outputs' and the mix's gradients, and each block's
    // partial gate sums, which are then added in block order (the same sums for any thread count).
    constexpr int64_t kRows = 64;
    const int64_t blocks = (f.rows + kRows - 1) / kRows;
    const int64_t width = int64_t(f.paths) * f.cols;
    std::vector<double> part(static_cast<std::size_t>(blocks * width), 0.0);
    parallel_for(blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t r = b * kRows; r < std::min(f.rows, (b + 1) * kRows); ++r)
          for (int i = 0; i < f.paths; ++i) {
            double mix_sum = 0;
            T* go = static_cast<T*>(p.gouts[i]);
            double* gate_sum = part.data() + b * width + int64_t(i) * f.cols;
            for (int64_t c = 0; c < f.cols; ++c) {
              const int64_t e = r * f.cols + c;
              const double g = gy[e];
              if (go != nullptr) go[e] = static_cast<T>(g * gate(i, c) * m(i, r));
              mix_sum += g * out(i, e) * gate(i, c);
              gate_sum[c] += g * out(i, e) * m(i, r);
            }
            if (p.gmix != nullptr)
              static_cast<T*>(p.gmix)[r * f.paths + i] = static_cast<T>(mix_sum);
          }
    });
    for (int i = 0; i < f.paths; ++i) {
      T* gg = static_cast<T*>(p.ggates[i]);
      if (gg == nullptr) continue;
      for (int64_t c = 0; c < f.cols; ++c) {
        double acc = 0;
        for (int64_t b = 0; b < blocks; ++b) acc += part[b * width + int64_t(i) * f.cols + c];
        gg[c] = static_cast<T>(acc);
      }
    }
  });
}

}  // namespace hydra::kernels::cpu
