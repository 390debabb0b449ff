#include "parallel/communicator.h"

#include <cstring>

#include "autograd/ops.h"
#include "base/check.h"

namespace hydra::parallel {
namespace {

class DoneWork final : public Work {
 public:
  void wait() override {}
};

}  // namespace

void Communicator::all_reduce_host(std::vector<double>& values, ReduceOp op) {
  if (size() == 1 || values.empty()) return;
  Tensor t = tensor(values, {static_cast<int64_t>(values.size())}).to(device());
  all_reduce(t, op);
  synchronize();  // a deadline instead of a hang in the copy below
  values = t.cpu().to_vector<double>();
}

void HostSum::sum(Communicator* comm, ReduceOp op) const {
  if (comm == nullptr || comm->size() == 1) return;
  std::vector<double> flat;
  for (const std::span<double>& p : parts_) flat.insert(flat.end(), p.begin(), p.end());
  comm->all_reduce_host(flat, op);
  std::size_t i = 0;
  for (const std::span<double>& p : parts_)
    for (double& v : p) v = flat[i++];
}

double Communicator::all_reduce_host(double value, ReduceOp op) {
  std::vector<double> v{value};
  all_reduce_host(v, op);
  return v[0];
}

std::unique_ptr<Work> SelfCommunicator::all_reduce_async(const Tensor&) {
  return std::make_unique<DoneWork>();
}

void SelfCommunicator::all_gather(const Tensor& in, const Tensor& out) {
  HYDRA_CHECK(in.numel() == out.numel()) << "all_gather on '" << name_ << "': sizes differ";
  if (in.numel() == 0 || in.raw_data() == out.raw_data()) return;  // in place
  Tensor o = out;
  o.copy_(in.reshape(out.shape()));
}

void SelfCommunicator::reduce_scatter(const Tensor& in, const Tensor& out) {
  HYDRA_CHECK(in.numel() == out.numel()) << "reduce_scatter on '" << name_ << "': sizes differ";
  Tensor o = out;
  o.copy_(in.reshape(out.shape()));
}

std::unique_ptr<Work> SelfCommunicator::reduce_scatter_async(const Tensor& in, const Tensor& out) {
  reduce_scatter(in, out);
  return std::make_unique<DoneWork>();
}

void SelfCommunicator::all_to_all_v(const Tensor& send, const std::vector<int64_t>& send_counts,
                                    const Tensor& recv, const std::vector<int64_t>& recv_counts) {
  HYDRA_CHECK(send_counts.size() == 1 && recv_counts.size() == 1 &&
              send_counts[0] == recv_counts[0] && send.numel() == recv.numel())
      << "all_to_all_v on '" << name_ << "': one rank must receive what it sends";
  Tensor r = recv;
  if (send.numel() > 0) r.copy_(send.reshape(recv.shape()));
}

void SelfCommunicator::send_recv(const Tensor& send, int dest, const Tensor& recv, int src) {
  HYDRA_CHECK(dest < 0 && src < 0) << "send_recv on '" << name_ << "': a single rank has no peers";
}

}  // namespace hydra::parallel
