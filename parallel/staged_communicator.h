// CUDA tensors over MPI: each operation copies its device tensors to host memory, runs the MPI
// communicator's operation there, and copies the results back onto the compute stream. Every call
// synchronizes the compute stream and crosses PCIe twice, so it is slow; what it buys is that it
// needs neither NCCL nor a GPU per rank — several ranks may share one GPU. For tests of the GPU
// paths under a process grid on a one-GPU machine, and for debugging (parallel.comm = MPI with
// train.device = cuda); NCCL is the production path. Sums of bf16 tensors are done in f32 on the
// host.
#pragma once

#include <memory>

#include "parallel/mpi_communicator.h"

namespace hydra::parallel {

class HostStagedCommunicator final : public Communicator {
 public:
  HostStagedCommunicator(std::unique_ptr<MpiCommunicator> mpi, Device device);

  int rank() const override { return mpi_->rank(); }
  int size() const override { return mpi_->size(); }
  const std::string& name() const override { return mpi_->name(); }
  Device device() const override { return device_; }

  void all_reduce(const Tensor& t, ReduceOp op) override;
  std::unique_ptr<Work> all_reduce_async(const Tensor& t) override;
  void all_gather(const Tensor& in, const Tensor& out) override;
  void reduce_scatter(const Tensor& in, const Tensor& out) override;
  std::unique_ptr<Work> reduce_scatter_async(const Tensor& in, const Tensor& out) override;
  void broadcast(const Tensor& t, int root) override;
  void all_to_all_v(const Tensor& send, const std::vector<int64_t>& send_counts, const Tensor& recv,
                    const std::vector<int64_t>& recv_counts) override;
  void send_recv(const Tensor& send, int dest, const Tensor& recv, int src) override;
  void barrier() override { mpi_->barrier(); }
  std::unique_ptr<Communicator> split(int color, int key, std::string name) const override;
  void set_timeout(std::chrono::seconds t) override;

 private:
  // A host copy of device tensor t (f32 for a bf16 tensor that will be summed), or an empty host
  // tensor of its shape when `values` is false (a receive buffer).
  Tensor host(const Tensor& t, bool values, bool summed = false) const;
  void check(const Tensor& t, const char* call) const;

  std::unique_ptr<MpiCommunicator> mpi_;
  Device device_;
};

}  // namespace hydra::parallel
