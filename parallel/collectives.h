// Differentiable collectives: each forward exchange has the adjoint exchange as its backward, so a
// model split over ranks gets the same gradients as the unsplit model. The backward of each runs on
// every rank (record_collective_op), also where no gradient arrived (it then sends zeros), so the
// ranks never wait for one another in vain — provided the backward reaches its node: a rank that
// does not use a collective's output must anchor it (autograd/node.h; the language model anchors
// every collective of a forward at its loss, and parallel/sequence.h's functions anchor theirs at
// their outputs). Tensors have the same shape on every rank unless noted.
#pragma once

#include <vector>

#include "parallel/communicator.h"

namespace hydra::parallel {

// [n, ...] on every rank -> [size * n, ...] in rank order. Backward: reduce-scatter (sum).
Tensor all_gather(const Tensor& x, Communicator& c);
// The sum over ranks. Backward: the sum over ranks of the gradients.
Tensor all_reduce_sum(const Tensor& x, Communicator& c);
// Rows [sum send_counts, ...] -> [sum recv_counts, ...]: send_counts[p] rows go to peer p, in peer
// order. Backward: the reverse exchange (counts swapped).
Tensor all_to_all(const Tensor& x, const std::vector<int64_t>& send_counts,
                  const std::vector<int64_t>& recv_counts, Communicator& c);
// Rank r gets x of rank r - 1 (rank 0 gets zeros); x goes to rank r + 1. Backward: the reverse.
Tensor shift_from_previous(const Tensor& x, Communicator& c);
// Rank r gets x of rank r + 1 (the last rank gets zeros). Backward: the reverse.
Tensor shift_from_next(const Tensor& x, Communicator& c);

// A serial chain along the ranks (state passed rank to rank): rank 0 returns `first`; rank r > 0
// receives a tensor shaped like `first` from rank r - 1 (sent there by send_to_next). Backward: the
// gradient goes back to rank r - 1 (on rank 0, to `first`).
Tensor receive_from_previous(const Tensor& first, Communicator& c);
// Sends x to rank r + 1 (nothing on the last rank) and returns a zero scalar that the caller adds
// to its loss: the gradient of x arrives from rank r + 1 in the backward, through that scalar's
// node.
Tensor send_to_next(const Tensor& x, Communicator& c);

}  // namespace hydra::parallel
