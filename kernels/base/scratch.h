// The determinism switch (train.deterministic). Scratch memory, which the file is named for, is a
// convention, not code: a kernel family that needs more than registers and shared memory declares
// `size_t <kernel>_workspace(const Params&)` in its header and takes `workspace` in its Params; the
// caller (autograd) allocates that many bytes through its caching allocator; CPU kernels allocate
// their own and ignore it.
#pragma once

#include <cstddef>

namespace hydra::kernels {

// Whether kernels must take their bit-reproducible path. Default: true, so every kernel gives the
// same bits run to run; false lets the kernels that have a faster non-deterministic path (float
// atomics) use it.
bool deterministic();
void set_deterministic(bool on);

}  // namespace hydra::kernels
