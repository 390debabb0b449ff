// Every CUDA runtime call is checked: a failure throws hydra::Error naming the call, file and line.
#pragma once

#include <cuda_runtime.h>

#include "base/check.h"

#define HYDRA_CUDA_CHECK(expr)                                               \
  do {                                                                       \
    const cudaError_t hydra_cuda_err_ = (expr);                              \
    HYDRA_CHECK(hydra_cuda_err_ == cudaSuccess)                              \
        << #expr << " failed: " << cudaGetErrorName(hydra_cuda_err_) << ": " \
        << cudaGetErrorString(hydra_cuda_err_);                              \
  } while (0)

// After a kernel launch: reports launch-configuration errors at the launch site.
#define HYDRA_CUDA_LAUNCH_CHECK() HYDRA_CUDA_CHECK(cudaGetLastError())

namespace hydra::kernels::cuda {
inline cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }
}  // namespace hydra::kernels::cuda
