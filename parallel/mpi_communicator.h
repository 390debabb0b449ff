// Communicator over MPI for CPU tensors. Blocking calls are non-blocking MPI operations waited on
// with a deadline (the communicator's timeout); async all-reduces run on a worker thread over a
// duplicate of the communicator, so they overlap with the caller's compute and never interleave
// with its collectives. Every MPI return code is checked.
#pragma once

#include <mpi.h>

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>

#include "parallel/communicator.h"

namespace hydra::parallel {

class MpiCommunicator final : public Communicator {
 public:
  // Takes ownership of `comm` (freed in the destructor unless it is MPI_COMM_WORLD).
  MpiCommunicator(MPI_Comm comm, std::string name);
  ~MpiCommunicator() override;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }
  Device device() const override { return Device::cpu(); }
  MPI_Comm comm() const { return comm_; }

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

  // A new communicator of the ranks passing the same color, ordered by key (MPI_Comm_split).
  std::unique_ptr<Communicator> split(int color, int key, std::string name) const override;
  std::unique_ptr<MpiCommunicator> split_mpi(int color, int key, std::string name) const;

  // After a timeout (this communicator's, or the NCCL communicator's it bootstraps): every rank
  // that timed out reports on roll_comm_ and listens for the others' reports for a few seconds;
  // returns the part of the message that names the ranks (world ranks) that did not report.
  std::string roll_call() const;

 private:
  class AsyncWork;
  void check(int rc, const char* call) const;
  void wait(MPI_Request* req, const char* call, MPI_Comm comm, bool cancellable = false,
            MPI_Status* status = nullptr) const;
  void wait_all(std::vector<MPI_Request>& reqs, const char* call) const;
  void all_reduce_on(MPI_Comm comm, const Tensor& t, ReduceOp op) const;
  void reduce_scatter_on(MPI_Comm comm, const Tensor& in, const Tensor& out) const;
  // Runs `job` on the worker thread (over async_comm_), or now when MPI allows one thread only.
  std::unique_ptr<Work> run_async(std::function<void()> job);
  void worker_loop();

  MPI_Comm comm_ = MPI_COMM_NULL;
  MPI_Comm async_comm_ = MPI_COMM_NULL;  // duplicate used by the worker thread
  MPI_Comm roll_comm_ = MPI_COMM_NULL;   // duplicate for the roll call after a timeout
  int rank_ = 0, size_ = 1;
  std::string name_;

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  bool stop_ = false;
  std::thread worker_;
};

}  // namespace hydra::parallel
