#include "parallel/experts.h"

#include "autograd/ops.h"
#include "parallel/collectives.h"

namespace hydra::parallel {

ExpertDispatch dispatch_to_experts(const Tensor& xs, const std::vector<int64_t>& sizes,
                                   int64_t local_experts, Communicator& ep) {
  const int64_t P = ep.size(), El = local_experts, E = static_cast<int64_t>(sizes.size());
  HYDRA_CHECK(P * El == E) << "expert parallelism: an ep group of " << P << " ranks holding " << El
                           << " experts each cannot serve " << E << " experts";
  ExpertDispatch d;
  d.send_counts.assign(P, 0);
  for (int64_t e = 0; e < E; ++e) d.send_counts[e / El] += sizes[e];
  const Tensor sizes_out = tensor(sizes, {E}).to(ep.device());
  Tensor sizes_in = Tensor::empty({E}, DType::kI64, ep.device());  // [peer][local expert]
  ep.all_to_all_v(sizes_out, std::vector<int64_t>(P, El), sizes_in, std::vector<int64_t>(P, El));
  d.recv_counts.assign(P, 0);
  d.groups = sizes_in.cpu().to_vector<int64_t>();
  for (int64_t p = 0; p < P; ++p)
    for (int64_t e = 0; e < El; ++e) d.recv_counts[p] += d.groups[p * El + e];
  d.rows = all_to_all(xs, d.send_counts, d.recv_counts, ep);
  return d;
}

Tensor combine_from_experts(const Tensor& y, const ExpertDispatch& d, Communicator& ep) {
  return all_to_all(y, d.recv_counts, d.send_counts, ep);
}

}  // namespace hydra::parallel
