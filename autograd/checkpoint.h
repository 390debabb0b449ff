// Activation recomputation. checkpoint(fn, inputs) runs fn without recording a graph and keeps only
// its inputs; in the backward it re-runs fn with grad on (replaying the default generator's state,
// so random draws repeat) and backpropagates through that recomputation. Parameters fn uses receive
// their gradients during that nested backward. Memory: fn's intermediates live only inside its
// backward.
#pragma once

#include <functional>
#include <vector>

#include "autograd/tensor.h"

namespace hydra {

using CheckpointFn = std::function<std::vector<Tensor>(const std::vector<Tensor>& inputs)>;

std::vector<Tensor> checkpoint(const CheckpointFn& fn, const std::vector<Tensor>& inputs);

// True while a checkpoint's backward re-runs its function: code that records statistics or advances
// state once per step checks this to not do it twice.
bool is_recomputing();

}  // namespace hydra
