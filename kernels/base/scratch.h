// Scratch memory for kernels that need more than registers and shared memory (partial sums, sort
// buffers). A kernel family that needs it declares `size_t <kernel>_workspace(const Params&)` in its
// header and takes `workspace` in its Params; the caller (autograd) allocates that many bytes on the
// device through its caching allocator. The CPU kernels allocate their own and ignore it.
#pragma once

#include <cstddef>

namespace hydra::kernels {

// Whether kernels that have a faster non-deterministic path (atomics) may use it. Default: false, so
// every kernel is bit-reproducible run to run.
bool deterministic();
void set_deterministic(bool on);

}  // namespace hydra::kernels
