// The expert-parallel exchange (DESIGN.md, "Parallelism"): chunk rows grouped by expert travel to
// the rank that holds their expert and come back after it ran. Experts [p El, (p + 1) El) live on
// rank p of the ep group. Both directions are differentiable; their backward is the mirror
// exchange.
#pragma once

#include <vector>

#include "parallel/communicator.h"

namespace hydra::parallel {

// What the combine needs to send each row back where it came from.
struct ExpertDispatch {
  Tensor rows;                       // [n, d]: the rows for this rank's experts, in arrival order
  std::vector<int64_t> groups;       // [P * El]: rows from peer p for local expert e at p * El + e:
                                     // grouped_linear takes them as they are (no reorder pass)
  std::vector<int64_t> send_counts;  // [P]: rows this rank sent to each peer
  std::vector<int64_t> recv_counts;  // [P]: rows it received from each peer
};

// xs [sum(sizes), d] grouped by expert (sizes [E], E = P * El). One all-to-all of the sizes (every
// rank learns how many rows of each local expert each peer sends: the host needs them for the
// counts, the only host synchronisation) and one all-to-all-v of the rows.
ExpertDispatch dispatch_to_experts(const Tensor& xs, const std::vector<int64_t>& sizes,
                                   int64_t local_experts, Communicator& ep);

// y [n, d] in the order of d.rows -> this rank's rows [sum(sizes), d] in xs's order.
Tensor combine_from_experts(const Tensor& y, const ExpertDispatch& d, Communicator& ep);

}  // namespace hydra::parallel
