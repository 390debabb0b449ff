#include "kernels/elementwise.h"

#include <algorithm>
#include <cmath>

#include "kernels/base/parallel.h"
#include "kernels/cpu/common.h"

namespace hydra::kernels::cpu {
namespace {

constexpr int64_t kGrain = 1 << 14;

template <class T, class F>
void map1(const void* x, void* y, int64_t n, F f) {
  const T* xs = static_cast<const T*>(x);
  T* ys = static_cast<T*>(y);
  parallel_for(n, kGrain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) ys[i] = f(xs[i]);
  });
}

// gx[i] = gy[i] * f(x[i], y[i])
template <class T, class F>
void map_bwd(const UnaryBwdParams& p, F f) {
  const T* x = static_cast<const T*>(p.x);
  const T* y = static_cast<const T*>(p.y);
  const T* gy = static_cast<const T*>(p.gy);
  T* gx = static_cast<T*>(p.gx);
  parallel_for(p.n, kGrain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) gx[i] = gy[i] * f(x ? x[i] : T(0), y ? y[i] : T(0));
  });
}

template <class T>
T gelu(T x) {
  return T(0.5) * x * (T(1) + std::erf(x * T(0.70710678118654752)));
}

template <class T>
T gelu_grad(T x) {
  const T cdf = T(0.5) * (T(1) + std::erf(x * T(0.70710678118654752)));
  const T pdf = std::exp(T(-0.5) * x * x) * T(0.39894228040143268);
  return cdf + x * pdf;
}

}  // namespace

void unary_fwd(const UnaryParams& p) {
  dispatch_float(p.dtype, "unary", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T alpha = static_cast<T>(p.alpha), beta = static_cast<T>(p.beta);
    switch (p.op) {
      case UnaryOp::kNeg:
        return map1<T>(p.x, p.y, p.n, [](T v) { return -v; });
      case UnaryOp::kExp:
        return map1<T>(p.x, p.y, p.n, [](T v) { return std::exp(v); });
      case UnaryOp::kLog:
        return map1<T>(p.x, p.y, p.n, [](T v) { return std::log(v); });
      case UnaryOp::kSigmoid:
        return map1<T>(p.x, p.y, p.n, [](T v) { return sigmoid(v); });
      case UnaryOp::kSilu:
        return map1<T>(p.x, p.y, p.n, [](T v) { return v * sigmoid(v); });
      case UnaryOp::kSoftplus:
        return map1<T>(p.x, p.y, p.n, [](T v) { return softplus(v); });
      case UnaryOp::kGelu:
        return map1<T>(p.x, p.y, p.n, [](T v) { return gelu(v); });
      case UnaryOp::kRelu:
        return map1<T>(p.x, p.y, p.n, [](T v) { return v > T(0) ? v : T(0); });
      case UnaryOp::kSqrt:
        return map1<T>(p.x, p.y, p.n, [](T v) { return std::sqrt(v); });
      case UnaryOp::kRsqrt:
        return map1<T>(p.x, p.y, p.n, [](T v) { return T(1) / std::sqrt(v); });
      case UnaryOp::kSquare:
        return map1<T>(p.x, p.y, p.n, [](T v) { return v * v; });
      case UnaryOp::kTanh:
        return map1<T>(p.x, p.y, p.n, [](T v) { return std::tanh(v); });
      case UnaryOp::kAffine:
        return map1<T>(p.x, p.y, p.n, [=](T v) { return alpha * v + beta; });
      case UnaryOp::kPow:
        return map1<T>(p.x, p.y, p.n, [=](T v) { return std::pow(v, alpha); });
    }
  });
}

void unary_bwd(const UnaryBwdParams& p) {
  dispatch_float(p.dtype, "unary_bwd", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T alpha = static_cast<T>(p.alpha);
    switch (p.op) {
      case UnaryOp::kNeg:
        return map_bwd<T>(p, [](T, T) { return T(-1); });
      case UnaryOp::kExp:
        return map_bwd<T>(p, [](T, T y) { return y; });
      case UnaryOp::kLog:
        return map_bwd<T>(p, [](T x, T) { return T(1) / x; });
      case UnaryOp::kSigmoid:
        return map_bwd<T>(p, [](T, T y) { return y * (T(1) - y); });
      case UnaryOp::kSilu:
        return map_bwd<T>(p, [](T x, T) {
          const T s = sigmoid(x);
          return s * (T(1) + x * (T(1) - s));
        });
      case UnaryOp::kSoftplus:
        return map_bwd<T>(p, [](T x, T) { return sigmoid(x); });
      case UnaryOp::kGelu:
        return map_bwd<T>(p, [](T x, T) { return gelu_grad(x); });
      case UnaryOp::kRelu:
        return map_bwd<T>(p, [](T x, T) { return x > T(0) ? T(1) : T(0); });
      case UnaryOp::kSqrt:
        return map_bwd<T>(p, [](T, T y) { return T(0.5) / y; });
      case UnaryOp::kRsqrt:
        return map_bwd<T>(p, [](T, T y) { return T(-0.5) * y * y * y; });
      case UnaryOp::kSquare:
        return map_bwd<T>(p, [](T x, T) { return T(2) * x; });
      case UnaryOp::kTanh:
        return map_bwd<T>(p, [](T, T y) { return T(1) - y * y; });
      case UnaryOp::kAffine:
        return map_bwd<T>(p, [=](T, T) { return alpha; });
      case UnaryOp::kPow:
        return map_bwd<T>(p, [=](T x, T) { return alpha * std::pow(x, alpha - T(1)); });
    }
  });
}

namespace {

template <class T, class F>
void binary_loop(const BinaryParams& p, F f) {
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  T* out = static_cast<T*>(p.out);
  const int nd = p.ndim;
  const int64_t last = nd > 0 ? p.shape[nd - 1] : 1;
  const int64_t as = nd > 0 ? p.a_strides[nd - 1] : 0;
  const int64_t bs = nd > 0 ? p.b_strides[nd - 1] : 0;
  int64_t rows = 1;
  for (int d = 0; d + 1 < nd; ++d) rows *= p.shape[d];
  if (rows * last == 0) return;
  parallel_for(rows, grain_for(last, kGrain), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      int64_t ao = 0, bo = 0, rem = r;
      for (int d = nd - 2; d >= 0; --d) {
        const int64_t i = rem % p.shape[d];
        rem /= p.shape[d];
        ao += i * p.a_strides[d];
        bo += i * p.b_strides[d];
      }
      T* o = out + r * last;
      if (as == 1 && bs == 1) {
        for (int64_t j = 0; j < last; ++j) o[j] = f(a[ao + j], b[bo + j]);
      } else if (as == 1 && bs == 0) {
        const T bv = b[bo];
        for (int64_t j = 0; j < last; ++j) o[j] = f(a[ao + j], bv);
      } else if (as == 0 && bs == 1) {
        const T av = a[ao];
        for (int64_t j = 0; j < last; ++j) o[j] = f(av, b[bo + j]);
      } else {
        for (int64_t j = 0; j < last; ++j) o[j] = f(a[ao + j * as], b[bo + j * bs]);
      }
    }
  });
}

}  // namespace

void binary(const BinaryParams& p) {
  dispatch_float(p.dtype, "binary", [&](auto tag) {
    using T = typename decltype(tag)::type;
    switch (p.op) {
      case BinaryOp::kAdd:
        return binary_loop<T>(p, [](T x, T y) { return x + y; });
      case BinaryOp::kSub:
        return binary_loop<T>(p, [](T x, T y) { return x - y; });
      case BinaryOp::kMul:
        return binary_loop<T>(p, [](T x, T y) { return x * y; });
      case BinaryOp::kDiv:
        return binary_loop<T>(p, [](T x, T y) { return x / y; });
      case BinaryOp::kMaximum:
        return binary_loop<T>(p, [](T x, T y) { return std::max(x, y); });
      case BinaryOp::kMinimum:
        return binary_loop<T>(p, [](T x, T y) { return std::min(x, y); });
    }
  });
}

}  // namespace hydra::kernels::cpu
