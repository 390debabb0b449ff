// One interface for moving tensors between ranks: MpiCommunicator (CPU tensors, over MPI) and
// NcclCommunicator (CUDA tensors, over NCCL on its own stream). Every call names what went wrong
// and on which rank; a collective that does not finish within the communicator's timeout raises
// instead of hanging (the launcher then takes the job down).
//
// Tensors are contiguous and live on the communicator's device type. Counts in all_to_all_v are in
// rows of the tensors' trailing dimensions (send.numel() / send.size(0) elements per row).
#pragma once

#include <chrono>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "autograd/tensor.h"
#include "base/status.h"

namespace hydra::parallel {

enum class ReduceOp { kSum, kMax, kMin };

// An operation in flight. wait() returns when its result may be used (on the GPU: when work queued
// after it on the compute stream will see the result).
class Work {
 public:
  virtual ~Work() = default;
  virtual void wait() = 0;
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual const std::string& name() const = 0;  // "world", "dp", "ep", "sp", ... (for messages)
  virtual Device device() const = 0;            // where its tensors live
  bool on_gpu() const { return device().is_cuda(); }

  // In place on t.
  virtual void all_reduce(const Tensor& t, ReduceOp op = ReduceOp::kSum) = 0;
  // Starts an in-place sum; the tensor must not be touched until wait() (gradient buckets).
  virtual std::unique_ptr<Work> all_reduce_async(const Tensor& t) = 0;
  // out: [size * n, ...] <- every rank's in [n, ...] in rank order. `in` may be this rank's own
  // slice of `out` (the same memory): then it gathers in place, copying nothing locally. Every rank
  // of the call must use the same form (MPI requires MPI_IN_PLACE on all or none).
  virtual void all_gather(const Tensor& in, const Tensor& out) = 0;
  // out [n, ...] = sum over ranks of slice rank of in [size * n, ...].
  virtual void reduce_scatter(const Tensor& in, const Tensor& out) = 0;
  // Starts reduce_scatter(in, out) (a sum); neither tensor may be touched until wait() (ZeRO-1
  // buckets).
  virtual std::unique_ptr<Work> reduce_scatter_async(const Tensor& in, const Tensor& out) = 0;
  virtual void broadcast(const Tensor& t, int root) = 0;
  // Rows send_counts[p] of `send` (in peer order) go to peer p; recv_counts[p] rows arrive from p.
  virtual void all_to_all_v(const Tensor& send, const std::vector<int64_t>& send_counts,
                            const Tensor& recv, const std::vector<int64_t>& recv_counts) = 0;
  // Sends `send` to `dest` and receives `recv` from `src` (either may be -1: none), without
  // deadlock when every rank calls it (a shift along the ranks).
  virtual void send_recv(const Tensor& send, int dest, const Tensor& recv, int src) = 0;
  virtual void barrier() = 0;
  // A communicator of the ranks passing the same color, ordered by key (every rank must call it).
  virtual std::unique_ptr<Communicator> split(int color, int key, std::string name) const = 0;
  // Host waits until the communicator's queued work is done (GPU; a no-op where calls block).
  virtual void synchronize() {}

  // Host values (statistics, counts): summed (or max/min) over the ranks, in place.
  void all_reduce_host(std::vector<double>& values, ReduceOp op = ReduceOp::kSum);
  double all_reduce_host(double value, ReduceOp op = ReduceOp::kSum);

  std::chrono::seconds timeout() const { return timeout_; }
  virtual void set_timeout(std::chrono::seconds t) { timeout_ = t; }

 protected:
  std::chrono::seconds timeout_{600};
};

// Host values of named fields summed (or max/min) over the ranks in one all-reduce: each field is
// registered where it lives (a scalar or a span the caller owns and keeps in place until sum()),
// instead of packed at offsets into one vector. sum() gathers them in registration order, reduces
// once and writes each result back into its field; in one process (comm null or of one rank) it
// does nothing.
//   HostSum s;
//   s.add(tally.loss_sum).add(tally.targets).add(std::span(tally.answers));
//   s.sum(&grid.world());
class HostSum {
 public:
  HostSum& add(double& value) {
    parts_.emplace_back(&value, 1);
    return *this;
  }
  HostSum& add(std::span<double> values) {
    parts_.push_back(values);
    return *this;
  }
  void sum(Communicator* comm, ReduceOp op = ReduceOp::kSum) const;

 private:
  std::vector<std::span<double>> parts_;
};

// Every rank must train the same resolved config (`text`, config::to_text): ranks started with
// different files or --set values would otherwise fail later in a collective with a bare
// MPI_ERR_TRUNCATE, or not at all. On a difference, the error (the same on every rank) names the
// first line of the resolved config that differs from rank 0's, with both values; `source` is the
// config file, for the message.
Status check_same_config(Communicator& world, const std::string& text, const std::string& source);

// A communicator of one rank (no parallelism): every operation is a local copy. Lets code written
// for a grid run unchanged in a single process.
class SelfCommunicator final : public Communicator {
 public:
  explicit SelfCommunicator(std::string name, Device device = Device::cpu())
      : name_(std::move(name)), device_(device) {}
  int rank() const override { return 0; }
  int size() const override { return 1; }
  const std::string& name() const override { return name_; }
  Device device() const override { return device_; }
  void all_reduce(const Tensor&, ReduceOp) override {}
  std::unique_ptr<Work> all_reduce_async(const Tensor&) override;
  void all_gather(const Tensor& in, const Tensor& out) override;
  void reduce_scatter(const Tensor& in, const Tensor& out) override;
  std::unique_ptr<Work> reduce_scatter_async(const Tensor& in, const Tensor& out) override;
  void broadcast(const Tensor&, int) override {}
  void all_to_all_v(const Tensor& send, const std::vector<int64_t>& send_counts, const Tensor& recv,
                    const std::vector<int64_t>& recv_counts) override;
  void send_recv(const Tensor& send, int dest, const Tensor& recv, int src) override;
  void barrier() override {}
  std::unique_ptr<Communicator> split(int, int, std::string name) const override {
    return std::make_unique<SelfCommunicator>(std::move(name), device_);
  }

 private:
  std::string name_;
  Device device_;
};

}  // namespace hydra::parallel
