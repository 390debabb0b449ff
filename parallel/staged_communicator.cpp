#include "parallel/staged_communicator.h"

#include "base/check.h"

namespace hydra::parallel {
namespace {

// Waits for the host-side operation, then copies its result into the device tensor.
class StagedWork final : public Work {
 public:
  // `keep`: a host input the operation reads until it is done.
  StagedWork(std::unique_ptr<Work> inner, Tensor host, Tensor device, Tensor keep = {})
      : inner_(std::move(inner)),
        host_(std::move(host)),
        device_(std::move(device)),
        keep_(std::move(keep)) {}
  void wait() override {
    if (!inner_) return;
    inner_->wait();
    inner_.reset();
    device_.copy_(host_);
    keep_ = Tensor();
  }

 private:
  std::unique_ptr<Work> inner_;
  Tensor host_, device_, keep_;
};

}  // namespace

HostStagedCommunicator::HostStagedCommunicator(std::unique_ptr<MpiCommunicator> mpi, Device device)
    : mpi_(std::move(mpi)), device_(device) {
  HYDRA_CHECK(device_.is_cuda())
      << "HostStagedCommunicator '" << mpi_->name()
      << "': stages CUDA tensors; use the MPI communicator for CPU tensors";
  timeout_ = mpi_->timeout();
}

void HostStagedCommunicator::set_timeout(std::chrono::seconds t) {
  timeout_ = t;
  mpi_->set_timeout(t);
}

void HostStagedCommunicator::check(const Tensor& t, const char* call) const {
  HYDRA_CHECK(t.device() == device_) << call << " on communicator '" << name() << "': a tensor on "
                                     << t.device().str() << ", expected " << device_.str();
  HYDRA_CHECK(t.is_contiguous()) << call << " on communicator '" << name()
                                 << "': tensor must be contiguous";
}

Tensor HostStagedCommunicator::host(const Tensor& t, bool values, bool summed) const {
  const DType dt = summed && t.dtype() == DType::kBF16 ? DType::kF32 : t.dtype();
  if (!values) return Tensor::empty(t.shape(), dt, Device::cpu());
  return t.to(dt).cpu();  // waits for the compute stream: t's producers are done
}

// One rank: reductions and broadcasts are the identity; no round trip through the host.

void HostStagedCommunicator::all_reduce(const Tensor& t, ReduceOp op) {
  check(t, "all_reduce");
  if (size() == 1) return;
  Tensor h = host(t, true, true);
  mpi_->all_reduce(h, op);
  Tensor(t).copy_(h);
}

std::unique_ptr<Work> HostStagedCommunicator::all_reduce_async(const Tensor& t) {
  check(t, "all_reduce_async");
  if (size() == 1) return std::make_unique<StagedWork>(nullptr, Tensor(), Tensor());
  Tensor h = host(t, true, true);
  return std::make_unique<StagedWork>(mpi_->all_reduce_async(h), h, t);
}

void HostStagedCommunicator::all_gather(const Tensor& in, const Tensor& out) {
  check(in, "all_gather");
  check(out, "all_gather");
  Tensor h = host(out, false);
  mpi_->all_gather(host(in, true), h);
  Tensor(out).copy_(h);
}

void HostStagedCommunicator::reduce_scatter(const Tensor& in, const Tensor& out) {
  check(in, "reduce_scatter");
  check(out, "reduce_scatter");
  Tensor h = host(out, false, true);
  mpi_->reduce_scatter(host(in, true, true), h);
  Tensor(out).copy_(h);
}

std::unique_ptr<Work> HostStagedCommunicator::reduce_scatter_async(const Tensor& in,
                                                                   const Tensor& out) {
  check(in, "reduce_scatter_async");
  check(out, "reduce_scatter_async");
  Tensor h = host(out, false, true), hin = host(in, true, true);
  return std::make_unique<StagedWork>(mpi_->reduce_scatter_async(hin, h), h, out, hin);
}

void HostStagedCommunicator::broadcast(const Tensor& t, int root) {
  check(t, "broadcast");
  if (size() == 1) return;
  Tensor h = host(t, true);
  mpi_->broadcast(h, root);
  Tensor(t).copy_(h);
}

void HostStagedCommunicator::all_to_all_v(const Tensor& send,
                                          const std::vector<int64_t>& send_counts,
                                          const Tensor& recv,
                                          const std::vector<int64_t>& recv_counts) {
  check(send, "all_to_all_v");
  check(recv, "all_to_all_v");
  Tensor h = host(recv, false);
  mpi_->all_to_all_v(host(send, true), send_counts, h, recv_counts);
  Tensor(recv).copy_(h);
}

void HostStagedCommunicator::send_recv(const Tensor& send, int dest, const Tensor& recv, int src) {
  Tensor hs, hr;
  if (dest >= 0) {
    check(send, "send_recv");
    hs = host(send, true);
  }
  if (src >= 0) {
    check(recv, "send_recv");
    hr = host(recv, false);
  }
  mpi_->send_recv(hs, dest, hr, src);
  if (src >= 0) Tensor(recv).copy_(hr);
}

std::unique_ptr<Communicator> HostStagedCommunicator::split(int color, int key,
                                                            std::string name) const {
  auto sub = mpi_->split_mpi(color, key, std::move(name));
  sub->set_timeout(timeout_);
  return std::make_unique<HostStagedCommunicator>(std::move(sub), device_);
}

}  // namespace hydra::parallel
