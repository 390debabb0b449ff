// Helpers shared by the tests: random inputs (never zeros), comparisons with a reason, gradcheck.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "autograd/gradcheck.h"
#include "autograd/ops.h"
#include "kernels/attention.h"
#include "kernels/selective_scan.h"

namespace hydra::testing {

// Normal(0, scale) f64 tensor on the CPU that requires grad (a leaf).
inline Tensor randn64(const Shape& shape, uint64_t seed, double scale = 1.0,
                      bool requires_grad = true) {
  Generator gen(seed);
  Tensor t = randn(shape, gen, 0.0, scale, DType::kF64);
  t.set_requires_grad(requires_grad);
  return t;
}

inline Tensor randn32(const Shape& shape, uint64_t seed, double scale = 1.0) {
  Generator gen(seed);
  return randn(shape, gen, 0.0, scale, DType::kF32);
}

inline Tensor randidx(int64_t high, const Shape& shape, uint64_t seed) {
  Generator gen(seed);
  return randint(0, high, shape, gen, DType::kI64);
}

// ||a - b|| / ||b|| over all elements (both converted to f64 on the host).
inline double rel_error(const Tensor& a, const Tensor& b) {
  const std::vector<double> x = a.to_vector<double>(), y = b.to_vector<double>();
  EXPECT_EQ(x.size(), y.size());
  double num = 0, den = 0;
  for (std::size_t i = 0; i < x.size() && i < y.size(); ++i) {
    num += (x[i] - y[i]) * (x[i] - y[i]);
    den += y[i] * y[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

inline double max_abs_diff(const Tensor& a, const Tensor& b) {
  const std::vector<double> x = a.to_vector<double>(), y = b.to_vector<double>();
  EXPECT_EQ(x.size(), y.size());
  double m = 0;
  for (std::size_t i = 0; i < x.size() && i < y.size(); ++i) m = std::max(m, std::abs(x[i] - y[i]));
  return m;
}

inline bool bitwise_equal(const Tensor& a, const Tensor& b) {
  if (a.shape() != b.shape() || a.dtype() != b.dtype()) return false;
  const Tensor x = a.contiguous().cpu(), y = b.contiguous().cpu();
  return std::memcmp(x.raw_data(), y.raw_data(), x.nbytes()) == 0;
}

// Sets an environment variable for the scope, then restores its old value (or its absence).
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    ::setenv(name, value, 1);
  }
  ~ScopedEnv() {
    if (old_)
      ::setenv(name_.c_str(), old_->c_str(), 1);
    else
      ::unsetenv(name_.c_str());
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  std::string name_;
  std::optional<std::string> old_;
};

// The opt-in CUDA kernel forms' call counts and cuDNN's availability (0 and false in a build
// without CUDA, where the GPU tests skip).
inline int64_t scan_lanes_calls() {
#if HYDRA_WITH_CUDA
  return kernels::cuda::selective_scan_fwd_lanes_calls();
#else
  return 0;
#endif
}
inline int64_t cudnn_attention_calls() {
#if HYDRA_WITH_CUDA
  return kernels::cuda::attention_cudnn_calls();
#else
  return 0;
#endif
}
inline bool cudnn_attention_available() {
#if HYDRA_WITH_CUDA
  return kernels::cuda::attention_cudnn_available();
#else
  return false;
#endif
}
// The cap on one cuDNN attention call's scratch (returns the previous one), and the scratch the
// backward of bf16 causal attention over [batch x len, heads of head_dim] contiguous rows asks for
// on device 0 (no data is touched: the pointers only carry alignment).
inline int64_t cudnn_attention_set_max_workspace(int64_t bytes) {
#if HYDRA_WITH_CUDA
  return kernels::cuda::attention_cudnn_set_max_workspace(bytes);
#else
  return bytes;
#endif
}
inline int64_t cudnn_attention_backward_workspace(int64_t batch, int64_t len, int64_t heads,
                                                  int64_t head_dim) {
#if HYDRA_WITH_CUDA
  void* const fake = reinterpret_cast<void*>(uintptr_t{1} << 20);
  kernels::AttentionBwdParams q;
  q.fwd.dtype = DType::kBF16;
  q.fwd.batch = batch, q.fwd.heads = heads, q.fwd.q_len = len, q.fwd.k_len = len;
  q.fwd.head_dim = head_dim;
  q.fwd.q = q.fwd.k = q.fwd.v = q.fwd.out = q.fwd.lse = fake;
  q.fwd.q_row = q.fwd.k_row = q.fwd.v_row = heads * head_dim;
  q.fwd.scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  q.gout = q.gq = q.gk = q.gv = fake;
  return static_cast<int64_t>(kernels::cuda::attention_bwd_workspace(q));
#else
  return 0;
#endif
}

#define HYDRA_EXPECT_GRADCHECK(fn, inputs, ...)                                \
  do {                                                                         \
    const ::hydra::Status st_ = ::hydra::gradcheck(fn, inputs, ##__VA_ARGS__); \
    EXPECT_TRUE(st_.ok()) << st_.message();                                    \
  } while (0)

}  // namespace hydra::testing
