// Runs a kernel on the backend of `device` (internal to autograd/). HYDRA_LAUNCH names a family
// that has both backends; HYDRA_LAUNCH_CPU_ONLY one whose CUDA kernel does not exist yet: on a CUDA
// tensor it raises an error that names the kernel.
#pragma once

#include <cstddef>

#include "autograd/cuda_context.h"
#include "autograd/device.h"
#include "autograd/profiler.h"
#include "base/check.h"

#if HYDRA_WITH_CUDA
#define HYDRA_LAUNCH(device, fn, params)                           \
  do {                                                             \
    const ::hydra::KernelProfileScope hydra_profile_(device, #fn); \
    if ((device).is_cuda()) {                                      \
      ::hydra::kernels::cuda::fn(params);                          \
    } else {                                                       \
      ::hydra::kernels::cpu::fn(params);                           \
    }                                                              \
  } while (0)
#else
#define HYDRA_LAUNCH(device, fn, params)                                                           \
  do {                                                                                             \
    HYDRA_CHECK((device).is_cpu()) << #fn << ": this build has no CUDA backend (-DHYDRA_CUDA=ON)"; \
    const ::hydra::KernelProfileScope hydra_profile_(device, #fn);                                 \
    ::hydra::kernels::cpu::fn(params);                                                             \
  } while (0)
#endif

namespace hydra {
class Tensor;
// A device scratch buffer of at least `bytes` from the caching allocator (alive while the tensor
// is).
Tensor scratch(Device device, std::size_t bytes);
}  // namespace hydra

// The scratch a CUDA kernel asks for (`fn` = its <kernel>_workspace query), or an undefined tensor
// on the CPU. Use: Tensor ws = HYDRA_CUDA_WORKSPACE(dev, reduce_axis_workspace, p);
#if HYDRA_WITH_CUDA
#define HYDRA_CUDA_WORKSPACE(device, fn, params)                                     \
  ((device).is_cuda() ? ::hydra::scratch(device, ::hydra::kernels::cuda::fn(params)) \
                      : ::hydra::Tensor())
#else
#define HYDRA_CUDA_WORKSPACE(device, fn, params) ::hydra::Tensor()
#endif

#define HYDRA_LAUNCH_CPU_ONLY(device, fn, params)                                           \
  do {                                                                                      \
    HYDRA_CHECK((device).is_cpu()) << #fn << ": no CUDA kernel for this op yet (CPU only)"; \
    ::hydra::kernels::cpu::fn(params);                                                      \
  } while (0)
