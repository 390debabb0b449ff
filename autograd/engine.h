// Reverse-mode execution of the graph.
#pragma once

#include <vector>

#include "autograd/tensor.h"

namespace hydra {

// Backpropagates grads[i] from roots[i]. Nodes run when all their gradient inputs are in, in
// decreasing creation order among those ready (so the last layers' parameters finish first, which
// lets gradient communication start early). Leaves accumulate into .grad. Re-entrant (recomputation
// runs a nested backward). Saved tensors are freed unless retain_graph.
void run_backward(const std::vector<Tensor>& roots, const std::vector<Tensor>& grads,
                  bool retain_graph = false);

// For an op's backward, while the engine runs it: the gradient of its input `input` summed so far
// (from the ops that ran before it), when the op may add its own part into it in place instead of
// returning a new tensor for the engine to add (one pass over the gradient instead of two: a GEMM
// with beta = 1). Given only when the engine holds the sole reference, contiguous, of `shape`,
// `dtype` and `device`, its data at a multiple of `alignment` bytes (a kernel that reads rows in
// 16-byte packs asks for 16), and once per input. The op then returns this tensor as that input's
// gradient. Undefined otherwise (and outside a backward): the op returns its part as usual.
Tensor gradient_sum_target(std::size_t input, const Shape& shape, DType dtype, Device device,
                           std::size_t alignment = 1);

}  // namespace hydra
