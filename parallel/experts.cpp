#include "parallel/experts.h"

#include "autograd/ops.h"
#include "parallel/collectives.h"

namespace hydra::parallel {

ExpertDispatch dispatch_to_experts(const Tensor& xs, const std::vector<int64_t>& sizes, int64_t local_experts,
                                   Communicator& ep) {
  const int64_t P = ep.size(), El = local_experts, E = static_cast<int64_t>(sizes.size());
  HYDRA_CHECK(P * El == E) << "expert parallelism: an ep group of " << P << " ranks holding " << El
                           << " experts each cannot serve " << E << " experts";
  ExpertDispatch d;
  d.send_counts.assign(P, 0);
  for (int64_t e = 0; e < E; ++e) d.send_counts[e / El] += sizes[e];
  const Tensor sizes_out = tensor(sizes, {E}).to(ep.device());
  Tensor sizes_in = Tensor::empty({E}, DType::kI64, ep.device());  // [peer][local expert]
  ep.all_to_all_v(sizes_out, std::vector<int64_t>(P, El), sizes_in, std::vector<int64_t>(P, El));
  const std::vector<int64_t> in = sizes_in.cpu().to_vector<int64_t>();
  d.recv_counts.assign(P, 0);
  d.local_sizes.assign(El, 0);
  for (int64_t p = 0; p < P; ++p)
    for (int64_t e = 0; e < El; ++e) {
      d.recv_counts[p] += in[p * El + e];
      d.local_sizes[e] += in[p * El + e];
    }
  const Tensor received = all_to_all(xs, d.send_counts, d.recv_counts, ep);  // peer-major
  // order[i]: the row of `received` at expert-major position i; its inverse brings the outputs back.
  std::vector<int64_t> order, peer_start(P, 0);
  for (int64_t p = 1; p < P; ++p) peer_start[p] = peer_start[p - 1] + d.recv_counts[p - 1];
  for (int64_t e = 0; e < El; ++e)
    for (int64_t p = 0; p < P; ++p) {
      int64_t off = peer_start[p];
      for (int64_t k = 0; k < e; ++k) off += in[p * El + k];
      for (int64_t r = 0; r < in[p * El + e]; ++r) order.push_back(off + r);
    }
  std::vector<int64_t> inverse(order.size());
  for (std::size_t i = 0; i < order.size(); ++i) inverse[order[i]] = static_cast<int64_t>(i);
  const auto n = static_cast<int64_t>(order.size());
  d.rows = gather_rows(received, tensor(order, {n}).to(xs.device()));
  d.to_peer_major = tensor(inverse, {n}).to(xs.device());
  return d;
}

Tensor combine_from_experts(const Tensor& y, const ExpertDispatch& d, Communicator& ep) {
  return all_to_all(gather_rows(y, d.to_peer_major), d.recv_counts, d.send_counts, ep);
}

}  // namespace hydra::parallel
