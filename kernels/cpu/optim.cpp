#include "kernels/optim.h"

#include <cmath>

#include "kernels/base/parallel.h"
#include "kernels/cpu/common.h"

namespace hydra::kernels::cpu {
namespace {

template <class T>
inline void update(T& p, T g, T& m, T& v, const AdamWParams& a) {
  g *= static_cast<T>(a.grad_scale);
  m = static_cast<T>(a.beta1) * m + static_cast<T>(1 - a.beta1) * g;
  v = static_cast<T>(a.beta2) * v + static_cast<T>(1 - a.beta2) * g * g;
  const T mhat = m / static_cast<T>(a.bias_correction1),
          vhat = v / static_cast<T>(a.bias_correction2);
  p = p * static_cast<T>(1 - a.lr * a.weight_decay) -
      static_cast<T>(a.lr) * mhat / (std::sqrt(vhat) + static_cast<T>(a.eps));
}

// Clipping on the device (optim.h), here the host: the factor into a copy of the parameters; false
// when nothing is to be updated.
bool with_scale(const AdamWParams& in, AdamWParams* out) {
  *out = in;
  return in.sum_squares == nullptr || clip_scale(*in.sum_squares, in.clip, &out->grad_scale);
}

}  // namespace

void adamw_step(const AdamWParams& in) {
  AdamWParams a;
  if (!with_scale(in, &a)) return;
  dispatch_float(a.dtype, "adamw", [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* p = static_cast<T*>(a.param);
    const T* g = static_cast<const T*>(a.grad);
    T* m = static_cast<T*>(a.m);
    T* v = static_cast<T*>(a.v);
    parallel_for(a.n, 1 << 14, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) update(p[i], g[i], m[i], v[i], a);
    });
  });
}

void multi_adamw_step(const MultiAdamWParams& mp) {
  for (int i = 0; i < mp.count; ++i) {
    adamw_step(mp.single(i));
  }
}

void adamw_rows_step(const AdamWRowsParams& r) {
  AdamWParams a;
  if (!with_scale(r.base, &a)) return;
  dispatch_float(a.dtype, "adamw_rows", [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* p = static_cast<T*>(a.param);
    const T* g = static_cast<const T*>(a.grad);
    T* m = static_cast<T*>(a.m);
    T* v = static_cast<T*>(a.v);
    if (r.hits != nullptr) {  // every row hit, its values at its own row of g
      parallel_for(r.num_rows, grain_for(r.cols), [&](int64_t b, int64_t e) {
        for (int64_t j = b; j < e; ++j) {
          if (r.hits[j] == 0) continue;
          for (int64_t c = j * r.cols; c < (j + 1) * r.cols; ++c) update(p[c], g[c], m[c], v[c], a);
        }
      });
      return;
    }
    check_indices(r.rows, r.k, r.num_rows, "adamw_rows");
    parallel_for(r.k, grain_for(r.cols), [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) {
        const int64_t off = r.rows[j] * r.cols;
        for (int64_t c = 0; c < r.cols; ++c)
          update(p[off + c], g[j * r.cols + c], m[off + c], v[off + c], a);
      }
    });
  });
}

}  // namespace hydra::kernels::cpu
