// Elementwise kernels. Contiguous buffers go 16 bytes per thread per step (float4, 8 x bf16) when
// the pointers are aligned; arithmetic in fp32 (fp64 for f64). Binary ops with broadcasting use N-d
// indexing, with a vectorised fast path when both operands are contiguous and of the output's
// shape.
#include <cmath>
#include <type_traits>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/rows.cuh"
#include "kernels/elementwise.h"

namespace hydra::kernels::cuda {
namespace {

template <class T>
using Pack = RowPack<T>;  // 16 bytes of T (rows.cuh)

template <class C>
__device__ __forceinline__ C sigmoid(C x) {
  return fast_div(C(1), C(1) + fast_exp(-x));
}

template <class C>
__device__ __forceinline__ C unary_value(UnaryOp op, C x, C alpha, C beta) {
  switch (op) {
    case UnaryOp::kNeg:
      return -x;
    case UnaryOp::kExp:
      return fast_exp(x);
    case UnaryOp::kLog:
      return log(x);
    case UnaryOp::kSigmoid:
      return sigmoid(x);
    case UnaryOp::kSilu:
      return x * sigmoid(x);
    case UnaryOp::kSoftplus:
      return x > C(20) ? x : log1p(exp(x));
    case UnaryOp::kGelu:
      return C(0.5) * x * (C(1) + erf(x * C(0.70710678118654752)));
    case UnaryOp::kRelu:
      return x > C(0) ? x : C(0);
    case UnaryOp::kSqrt:
      return sqrt(x);
    case UnaryOp::kRsqrt:
      return C(1) / sqrt(x);
    case UnaryOp::kSquare:
      return x * x;
    case UnaryOp::kTanh:
      return tanh(x);
    case UnaryOp::kAffine:
      return alpha * x + beta;
    case UnaryOp::kPow:
      return pow(x, alpha);
  }
  return x;
}

// dy/dx from x and y (which of the two an op needs: see elementwise.h).
template <class C>
__device__ __forceinline__ C unary_grad(UnaryOp op, C x, C y, C alpha) {
  switch (op) {
    case UnaryOp::kNeg:
      return C(-1);
    case UnaryOp::kExp:
      return y;
    case UnaryOp::kLog:
      return C(1) / x;
    case UnaryOp::kSigmoid:
      return y * (C(1) - y);
    case UnaryOp::kSilu: {
      const C s = sigmoid(x);
      return s * (C(1) + x * (C(1) - s));
    }
    case UnaryOp::kSoftplus:
      return sigmoid(x);
    case UnaryOp::kGelu:
      return C(0.5) * (C(1) + erf(x * C(0.70710678118654752))) +
             x * exp(C(-0.5) * x * x) * C(0.39894228040143268);
    case UnaryOp::kRelu:
      return x > C(0) ? C(1) : C(0);
    case UnaryOp::kSqrt:
      return C(0.5) / y;
    case UnaryOp::kRsqrt:
      return C(-0.5) * y * y * y;
    case UnaryOp::kSquare:
      return C(2) * x;
    case UnaryOp::kTanh:
      return C(1) - y * y;
    case UnaryOp::kAffine:
      return alpha;
    case UnaryOp::kPow:
      return alpha * pow(x, alpha - C(1));
  }
  return C(0);
}

// kOp is a template argument so that the per-element switch disappears. The vector path keeps
// kUnaryUnroll packs of 16 bytes in flight per thread (one was too few to reach an H200's
// bandwidth).
constexpr int kUnaryUnroll = 4;

template <class T, UnaryOp kOp>
__global__ void unary_fwd_kernel(const T* __restrict x, T* __restrict y, int64_t n, double alpha,
                                 double beta, bool vec) {
  wait_for_previous_grid();  // launched with launch_after_previous
  using C = compute_t<T>;
  const C a = static_cast<C>(alpha), b = static_cast<C>(beta);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  if (vec) {
    constexpr int kN = Pack<T>::kN;
    const auto* xp = reinterpret_cast<const Pack<T>*>(x);
    auto* yp = reinterpret_cast<Pack<T>*>(y);
    const int64_t packs = n / kN;
    for (int64_t base = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; base < packs;
         base += kUnaryUnroll * stride) {
      Pack<T> buf[kUnaryUnroll];
#pragma unroll
      for (int u = 0; u < kUnaryUnroll; ++u)
        if (base + u * stride < packs) buf[u] = xp[base + u * stride];
#pragma unroll
      for (int u = 0; u < kUnaryUnroll; ++u) {
        if (base + u * stride >= packs) break;
        Pack<T> out;
#pragma unroll
        for (int k = 0; k < kN; ++k)
          out.v[k] = convert<T>(unary_value(kOp, convert<C>(buf[u].v[k]), a, b));
        yp[base + u * stride] = out;
      }
    }
    return;
  }
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += stride)
    y[i] = convert<T>(unary_value(kOp, load(x, i), a, b));
}

// Calls fn(std::integral_constant<UnaryOp, op>{}) for a runtime op.
template <class F>
void dispatch_unary(UnaryOp op, F&& fn) {
  switch (op) {
// clang-format off
#define HYDRA_UNARY_CASE(o) \
  case UnaryOp::o:          \
    return fn(std::integral_constant<UnaryOp, UnaryOp::o>{});
    HYDRA_UNARY_CASE(kNeg) HYDRA_UNARY_CASE(kExp) HYDRA_UNARY_CASE(kLog) HYDRA_UNARY_CASE(kSigmoid)
    HYDRA_UNARY_CASE(kSilu) HYDRA_UNARY_CASE(kSoftplus) HYDRA_UNARY_CASE(kGelu) HYDRA_UNARY_CASE(kRelu)
    HYDRA_UNARY_CASE(kSqrt) HYDRA_UNARY_CASE(kRsqrt) HYDRA_UNARY_CASE(kSquare) HYDRA_UNARY_CASE(kTanh)
    HYDRA_UNARY_CASE(kAffine) HYDRA_UNARY_CASE(kPow)
#undef HYDRA_UNARY_CASE
    // clang-format on
  }
  HYDRA_FAIL() << "unary: unknown op " << static_cast<int>(op);
}

template <class T>
__global__ void unary_bwd_kernel(UnaryOp op, const T* __restrict x, const T* __restrict y,
                                 const T* __restrict gy, T* __restrict gx, int64_t n,
                                 double alpha) {
  wait_for_previous_grid();
  using C = compute_t<T>;
  const C a = static_cast<C>(alpha);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const C xv = x ? load(x, i) : C(0), yv = y ? load(y, i) : C(0);
    gx[i] = convert<T>(load(gy, i) * unary_grad(op, xv, yv, a));
  }
}

template <class C>
__device__ __forceinline__ C binary_value(BinaryOp op, C a, C b) {
  switch (op) {
    case BinaryOp::kAdd:
      return a + b;
    case BinaryOp::kSub:
      return a - b;
    case BinaryOp::kMul:
      return a * b;
    case BinaryOp::kDiv:
      return a / b;
  }
  return a;
}

struct Geometry {
  int ndim;
  int64_t shape[kMaxDims], as[kMaxDims], bs[kMaxDims];
};

template <class T>
__global__ void binary_kernel(BinaryOp op, const T* __restrict a, const T* __restrict b,
                              T* __restrict out, Geometry g, int64_t n) {
  wait_for_previous_grid();
  using C = compute_t<T>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    int64_t rem = i, ao = 0, bo = 0;
    for (int d = g.ndim - 1; d >= 0; --d) {
      const int64_t k = rem % g.shape[d];
      rem /= g.shape[d];
      ao += k * g.as[d];
      bo += k * g.bs[d];
    }
    out[i] = convert<T>(binary_value(op, load(a, ao), load(b, bo)));
  }
}

template <class T>
__global__ void binary_contiguous_kernel(BinaryOp op, const T* __restrict a, const T* __restrict b,
                                         T* __restrict out, int64_t n) {
  wait_for_previous_grid();
  using C = compute_t<T>;
  constexpr int kN = Pack<T>::kN;
  const auto* ap = reinterpret_cast<const Pack<T>*>(a);
  const auto* bp = reinterpret_cast<const Pack<T>*>(b);
  auto* op_ = reinterpret_cast<Pack<T>*>(out);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n / kN;
       i += int64_t(gridDim.x) * blockDim.x) {
    const Pack<T> x = ap[i], y = bp[i];
    Pack<T> r;
#pragma unroll
    for (int k = 0; k < kN; ++k)
      r.v[k] = convert<T>(binary_value(op, convert<C>(x.v[k]), convert<C>(y.v[k])));
    op_[i] = r;
  }
}

// Up to three dimensions [outer, mid, cols] with each operand either read along the columns (column
// stride 1, its other strides multiples of the pack) or broadcast along them (column stride 0: one
// value per row, or per everything when its other strides are 0 too): the LayerScale gates [d], the
// per-token mixes [rows, 1] of the blocks, a chunk's vector added to each of its tokens [chunks, 1,
// d]. A thread per pack of the output (16 bytes), two divisions per pack.
template <class T>
__global__ void binary_rows_kernel(BinaryOp op, const T* __restrict a, const T* __restrict b,
                                   T* __restrict out, int64_t as0, int64_t as1, bool a_cols,
                                   int64_t bs0, int64_t bs1, bool b_cols, int64_t packs,
                                   uint32_t row_packs, uint32_t mid) {
  wait_for_previous_grid();
  using C = compute_t<T>;
  constexpr int kN = Pack<T>::kN;
  auto* op_ = reinterpret_cast<Pack<T>*>(out);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < packs;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / row_packs, c = (i - r * row_packs) * kN;
    const int64_t o = r / mid, m = r - o * mid;
    const int64_t ao = o * as0 + m * as1, bo = o * bs0 + m * bs1;
    Pack<T> x, y, res;
    if (a_cols) {
      x = *reinterpret_cast<const Pack<T>*>(a + ao + c);
    } else {
      const T v = a[ao];
#pragma unroll
      for (int k = 0; k < kN; ++k) x.v[k] = v;
    }
    if (b_cols) {
      y = *reinterpret_cast<const Pack<T>*>(b + bo + c);
    } else {
      const T v = b[bo];
#pragma unroll
      for (int k = 0; k < kN; ++k) y.v[k] = v;
    }
#pragma unroll
    for (int k = 0; k < kN; ++k)
      res.v[k] = convert<T>(binary_value(op, convert<C>(x.v[k]), convert<C>(y.v[k])));
    op_[i] = res;
  }
}

}  // namespace

void unary_fwd(const UnaryParams& p) {
  if (p.n == 0) return;
  dispatch_float(p.dtype, "unary", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const bool vec = aligned16(p.x) && aligned16(p.y) && p.n % Pack<T>::kN == 0;
    const int64_t work = vec ? (p.n / Pack<T>::kN + kUnaryUnroll - 1) / kUnaryUnroll : p.n;
    dispatch_unary(p.op, [&](auto op) {
      launch_after_previous(unary_fwd_kernel<T, decltype(op)::value>, dim3(blocks_for(work, 256)),
                            dim3(256), 0, as_stream(p.stream), static_cast<const T*>(p.x),
                            static_cast<T*>(p.y), p.n, p.alpha, p.beta, vec);
    });
    HYDRA_CUDA_LAUNCH_CHECK();
  });
}

void unary_bwd(const UnaryBwdParams& p) {
  if (p.n == 0) return;
  dispatch_float(p.dtype, "unary_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch_after_previous(unary_bwd_kernel<T>, dim3(blocks_for(p.n, 256)), dim3(256), 0,
                          as_stream(p.stream), p.op, static_cast<const T*>(p.x),
                          static_cast<const T*>(p.y), static_cast<const T*>(p.gy),
                          static_cast<T*>(p.gx), p.n, p.alpha);
    HYDRA_CUDA_LAUNCH_CHECK();
  });
}

void binary(const BinaryParams& p) {
  Geometry g{};
  g.ndim = p.ndim;
  int64_t n = 1;
  for (int d = 0; d < p.ndim; ++d) {
    g.shape[d] = p.shape[d];
    g.as[d] = p.a_strides[d];
    g.bs[d] = p.b_strides[d];
    n *= p.shape[d];
  }
  if (n == 0) return;
  dispatch_float(p.dtype, "binary", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const bool contiguous = p.ndim == 1 && p.a_strides[0] == 1 && p.b_strides[0] == 1;
    constexpr int kN = Pack<T>::kN;
    // As [outer, mid, cols] (fewer dimensions: outer and mid of 1): the rows kernel's layouts
    // (see binary_rows_kernel).
    const bool dims_ok = p.ndim >= 1 && p.ndim <= 3;
    const int last = p.ndim - 1;
    const int64_t cols = p.shape[last];
    const int64_t outer = p.ndim == 3 ? p.shape[0] : 1, mid = p.ndim >= 2 ? p.shape[last - 1] : 1;
    const int64_t as0 = p.ndim == 3 ? p.a_strides[0] : 0, bs0 = p.ndim == 3 ? p.b_strides[0] : 0;
    const int64_t as1 = p.ndim >= 2 ? p.a_strides[last - 1] : 0,
                  bs1 = p.ndim >= 2 ? p.b_strides[last - 1] : 0;
    const int64_t asc = p.a_strides[last], bsc = p.b_strides[last];
    const bool rows_ok =
        dims_ok && cols % kN == 0 && (asc == 0 || asc == 1) && (bsc == 0 || bsc == 1) &&
        (asc == 0 || (as0 % kN == 0 && as1 % kN == 0 && aligned16(p.a))) &&
        (bsc == 0 || (bs0 % kN == 0 && bs1 % kN == 0 && aligned16(p.b))) && aligned16(p.out) &&
        cols / kN <= int64_t{UINT32_MAX} && mid <= int64_t{UINT32_MAX};
    if (contiguous && aligned16(p.a) && aligned16(p.b) && aligned16(p.out) &&
        n % Pack<T>::kN == 0) {
      launch_after_previous(binary_contiguous_kernel<T>, dim3(blocks_for(n / Pack<T>::kN, 256)),
                            dim3(256), 0, as_stream(p.stream), p.op, static_cast<const T*>(p.a),
                            static_cast<const T*>(p.b), static_cast<T*>(p.out), n);
    } else if (rows_ok) {
      const int64_t packs = outer * mid * (cols / kN);
      launch_after_previous(binary_rows_kernel<T>, dim3(blocks_for(packs, 256)), dim3(256), 0,
                            as_stream(p.stream), p.op, static_cast<const T*>(p.a),
                            static_cast<const T*>(p.b), static_cast<T*>(p.out), as0, as1, asc == 1,
                            bs0, bs1, bsc == 1, packs, static_cast<uint32_t>(cols / kN),
                            static_cast<uint32_t>(mid));
    } else {
      launch_after_previous(binary_kernel<T>, dim3(blocks_for(n, 256)), dim3(256), 0,
                            as_stream(p.stream), p.op, static_cast<const T*>(p.a),
                            static_cast<const T*>(p.b), static_cast<T*>(p.out), g, n);
    }
    HYDRA_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace hydra::kernels::cuda
