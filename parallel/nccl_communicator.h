// Communicator over NCCL for CUDA tensors (built with HYDRA_CUDA). The NCCL unique id travels over
// the MPI bootstrap communicator. Operations run on the communicator's own stream: each first waits
// for the work already queued on the compute stream, and the compute stream waits for the operation
// before anything queued after it, so results are ordered without host synchronisation while other
// compute (not depending on them) can overlap. Tensors used are marked on the communication stream
// for the caching allocator. NCCL errors, including asynchronous ones, are checked; host waits have
// a deadline. Each communicator's calls must come in the same order on all its ranks; calls on
// different communicators may interleave differently (their kernels then run side by side: NCCL's
// kernels take a block per channel, so two or three communicators fit on a GPU beside the compute).
#pragma once

#include <memory>
#include <string>

#include "parallel/mpi_communicator.h"

namespace hydra::parallel {

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(std::unique_ptr<MpiCommunicator> bootstrap, int device);
  ~NcclCommunicator() override;

  int rank() const override { return bootstrap_->rank(); }
  int size() const override { return bootstrap_->size(); }
  const std::string& name() const override { return bootstrap_->name(); }
  Device device() const override { return Device::cuda(device_); }

  void all_reduce(const Tensor& t, ReduceOp op) override;
  std::unique_ptr<Work> all_reduce_async(const Tensor& t) override;
  void all_gather(const Tensor& in, const Tensor& out) override;
  void reduce_scatter(const Tensor& in, const Tensor& out) override;
  std::unique_ptr<Work> reduce_scatter_async(const Tensor& in, const Tensor& out) override;
  void broadcast(const Tensor& t, int root) override;
  void all_to_all_v(const Tensor& send, const std::vector<int64_t>& send_counts, const Tensor& recv,
                    const std::vector<int64_t>& recv_counts) override;
  void send_recv(const Tensor& send, int dest, const Tensor& recv, int src) override;
  void barrier() override;

  std::unique_ptr<Communicator> split(int color, int key, std::string name) const override;
  // Host waits until everything queued on this communicator has finished (deadline: timeout()).
  void synchronize() override;
  void set_timeout(std::chrono::seconds t) override;

  // The NCCL library loaded at run time, as "major.minor.patch".
  static std::string library_version();

 private:
  struct Impl;
  void begin(const std::vector<Tensor>& tensors);  // comm stream waits for compute
  void end(const std::vector<Tensor>& tensors);  // compute waits for comm; tensors recorded on comm
  void check_async();                  // aborts the communicator after an asynchronous error
  void await_ready(const char* call);  // until the last call's work is queued; deadline: timeout()
  [[noreturn]] void abort_after_timeout(
      const std::string& what);  // aborts the communicator, then fails

  std::unique_ptr<MpiCommunicator> bootstrap_;
  int device_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace hydra::parallel
