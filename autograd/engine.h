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

}  // namespace hydra
