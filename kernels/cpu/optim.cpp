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

}  // namespace

void adamw_step(const AdamWParams& a) {
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
  const AdamWParams& a = r.base;
  dispatch_float(a.dtype, "adamw_rows", [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* p = static_cast<T*>(a.param);
    const T* g = static_cast<const T*>(a.grad);
    T* m = static_cast<T*>(a.m);
    T* v = static_cast<T*>(a.v);
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
