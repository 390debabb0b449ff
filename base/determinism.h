// The determinism switch (train.deterministic).
#pragma once

namespace hydra {

// Whether kernels must take their bit-reproducible path. Default: true, so every kernel gives the
// same bits run to run; false lets the kernels that have a faster non-deterministic path (float
// atomics) use it.
bool deterministic();
void set_deterministic(bool on);

}  // namespace hydra
