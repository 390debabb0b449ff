#include "parallel/mpi_communicator.h"

#include <algorithm>
#include <chrono>
#include <climits>
#include <exception>
#include <future>
#include <sstream>
#include <vector>

#include "base/check.h"
#include "parallel/runtime.h"

namespace hydra::parallel {
namespace {

MPI_Datatype mpi_type(DType t, bool reducing, const std::string& where) {
  switch (t) {
    case DType::kF32:
      return MPI_FLOAT;
    case DType::kF64:
      return MPI_DOUBLE;
    case DType::kI32:
      return MPI_INT32_T;
    case DType::kI64:
      return MPI_INT64_T;
    case DType::kBF16:
      HYDRA_CHECK(!reducing) << where
                             << ": MPI cannot sum bf16 tensors (CPU tensors are f32 or f64)";
      return MPI_UINT16_T;
    default:
      HYDRA_FAIL() << where << ": dtype " << dtype_name(t) << " is not supported over MPI";
  }
}

MPI_Op mpi_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return MPI_SUM;
    case ReduceOp::kMax:
      return MPI_MAX;
    case ReduceOp::kMin:
      return MPI_MIN;
  }
  return MPI_SUM;
}

int as_count(int64_t n, const std::string& where) {
  HYDRA_CHECK(n >= 0 && n <= INT_MAX)
      << where << ": " << n << " elements exceed MPI's int count; split the tensor";
  return static_cast<int>(n);
}

void check_cpu(const Tensor& t, const std::string& where) {
  HYDRA_CHECK(t.device().is_cpu()) << where << ": MPI communicators move CPU tensors, got one on "
                                   << t.device().str() << " (use the NCCL communicator for GPUs)";
  HYDRA_CHECK(t.is_contiguous()) << where << ": tensor must be contiguous";
}

}  // namespace

class MpiCommunicator::AsyncWork final : public Work {
 public:
  explicit AsyncWork(std::future<void> f) : f_(std::move(f)) {}
  void wait() override {
    if (f_.valid()) f_.get();  // rethrows what the worker raised
  }

 private:
  std::future<void> f_;
};

MpiCommunicator::MpiCommunicator(MPI_Comm comm, std::string name)
    : comm_(comm), name_(std::move(name)) {
  MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
  check(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
  check(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
  // The asynchronous all-reduce's own communicator, made now: MPI_Comm_dup is collective, and made
  // on first use (inside a backward) it would wait for ranks busy with another group's exchange.
  check(MPI_Comm_dup(comm_, &async_comm_), "MPI_Comm_dup");
  MPI_Comm_set_errhandler(async_comm_, MPI_ERRORS_RETURN);
  check(MPI_Comm_dup(comm_, &roll_comm_), "MPI_Comm_dup");
  MPI_Comm_set_errhandler(roll_comm_, MPI_ERRORS_RETURN);
}

MpiCommunicator::~MpiCommunicator() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (worker_.joinable()) worker_.join();
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) return;
  if (async_comm_ != MPI_COMM_NULL) MPI_Comm_free(&async_comm_);
  if (roll_comm_ != MPI_COMM_NULL) MPI_Comm_free(&roll_comm_);
  if (comm_ != MPI_COMM_NULL && comm_ != MPI_COMM_WORLD) MPI_Comm_free(&comm_);
}

void MpiCommunicator::check(int rc, const char* call) const {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, text, &len);
  HYDRA_FAIL() << "rank " << process_info().rank << ": " << call << " on communicator '" << name_
               << "' failed: " << std::string(text, len);
}

void MpiCommunicator::wait(MPI_Request* req, const char* call, MPI_Comm comm, bool cancellable,
                           MPI_Status* status) const {
  (void)comm;
  const auto start = std::chrono::steady_clock::now();
  const auto deadline = start + timeout_;
  int flag = 0;
  for (int spins = 0;; ++spins) {
    check(MPI_Test(req, &flag, status != nullptr ? status : MPI_STATUS_IGNORE), call);
    if (flag) return;
    if (std::chrono::steady_clock::now() > deadline) {
      if (cancellable) {  // point-to-point: withdraw the request so the communicator stays usable
        MPI_Cancel(req);
        MPI_Request_free(req);
      }
      HYDRA_FAIL() << "rank " << process_info().rank << ": " << call << " on communicator '"
                   << name_ << "' did not complete within " << timeout_.count() << " s"
                   << roll_call();
    }
    if (spins > 200)
      std::this_thread::sleep_for(std::chrono::microseconds(spins > 5000 ? 200 : 20));
  }
}

std::string MpiCommunicator::roll_call() const {
  constexpr int kTag = 0x48594452;  // "HYDR": only roll calls travel on roll_comm_
  const auto grace = std::min<std::chrono::seconds>(timeout_, std::chrono::seconds(5));
  int me = rank_;
  std::vector<MPI_Request> sends;
  for (int r = 0; r < size_; ++r) {
    if (r == rank_) continue;
    MPI_Request req;
    if (MPI_Isend(&me, 1, MPI_INT, r, kTag, roll_comm_, &req) == MPI_SUCCESS) sends.push_back(req);
  }
  std::vector<char> heard(size_, 0);
  heard[rank_] = 1;
  int count = 1;
  const auto deadline = std::chrono::steady_clock::now() + grace;
  while (count < size_ && std::chrono::steady_clock::now() < deadline) {
    int flag = 0;
    MPI_Status status;
    if (MPI_Iprobe(MPI_ANY_SOURCE, kTag, roll_comm_, &flag, &status) != MPI_SUCCESS) break;
    if (!flag) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
      continue;
    }
    int from = -1;
    MPI_Recv(&from, 1, MPI_INT, status.MPI_SOURCE, kTag, roll_comm_, MPI_STATUS_IGNORE);
    if (!heard[status.MPI_SOURCE]) ++count;
    heard[status.MPI_SOURCE] = 1;
  }
  for (MPI_Request& req : sends) MPI_Request_free(&req);  // small: they complete on their own
  // The silent ranks, as world ranks (what mpirun and Slurm print).
  std::vector<int> silent, world(size_, -1);
  for (int r = 0; r < size_; ++r)
    if (!heard[r]) silent.push_back(r);
  MPI_Group group, world_group;
  if (!silent.empty() && MPI_Comm_group(comm_, &group) == MPI_SUCCESS &&
      MPI_Comm_group(MPI_COMM_WORLD, &world_group) == MPI_SUCCESS) {
    MPI_Group_translate_ranks(group, static_cast<int>(silent.size()), silent.data(), world_group,
                              world.data());
    MPI_Group_free(&group);
    MPI_Group_free(&world_group);
  }
  std::ostringstream os;
  if (silent.empty()) {
    os << ": every rank of the communicator timed out here too (they wait on each other: a "
          "different order of collectives on different ranks?)";
    return os.str();
  }
  os << ": rank" << (silent.size() > 1 ? "s " : " ");
  for (std::size_t i = 0; i < silent.size(); ++i)
    os << (i ? ", " : "") << (world[i] >= 0 ? world[i] : silent[i]);
  os << " did not reach it (no report within " << grace.count()
     << " s of this rank's timeout): dead, stuck elsewhere, or on a different path through the "
        "program; look at "
     << (silent.size() > 1 ? "their" : "its") << " log first";
  return os.str();
}

void MpiCommunicator::wait_all(std::vector<MPI_Request>& reqs, const char* call) const {
  for (std::size_t i = 0; i < reqs.size(); ++i) {
    try {
      wait(&reqs[i], call, comm_, true);
    } catch (...) {
      for (std::size_t j = i + 1; j < reqs.size(); ++j) {
        MPI_Cancel(&reqs[j]);
        MPI_Request_free(&reqs[j]);
      }
      throw;
    }
  }
}

void MpiCommunicator::all_reduce_on(MPI_Comm comm, const Tensor& t, ReduceOp op) const {
  const std::string where = "all_reduce";
  check_cpu(t, where);
  if (size_ == 1 || t.numel() == 0) return;
  MPI_Request req;
  check(MPI_Iallreduce(MPI_IN_PLACE, t.raw_data(), as_count(t.numel(), where),
                       mpi_type(t.dtype(), true, where), mpi_op(op), comm, &req),
        "MPI_Iallreduce");
  wait(&req, "MPI_Iallreduce", comm);
}

void MpiCommunicator::all_reduce(const Tensor& t, ReduceOp op) { all_reduce_on(comm_, t, op); }

void MpiCommunicator::worker_loop() {
  for (;;) {
    std::function<void()> job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stop_ and nothing left
      job = std::move(queue_.front());
      queue_.pop_front();
    }
    job();
  }
}

std::unique_ptr<Work> MpiCommunicator::run_async(std::function<void()> job) {
  auto task = std::make_shared<std::packaged_task<void()>>(std::move(job));
  std::future<void> f = task->get_future();
  if (process_info().threads_provided < MPI_THREAD_MULTIPLE || size_ == 1) {
    // No concurrent MPI calls allowed: do it now (correct, without overlap).
    (*task)();
    return std::make_unique<AsyncWork>(std::move(f));
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!worker_.joinable()) worker_ = std::thread([this] { worker_loop(); });
    queue_.push_back([task] { (*task)(); });
  }
  cv_.notify_one();
  return std::make_unique<AsyncWork>(std::move(f));
}

std::unique_ptr<Work> MpiCommunicator::all_reduce_async(const Tensor& t) {
  check_cpu(t, "all_reduce_async");
  return run_async([this, t] { all_reduce_on(async_comm_, t, ReduceOp::kSum); });
}

std::unique_ptr<Work> MpiCommunicator::reduce_scatter_async(const Tensor& in, const Tensor& out) {
  check_cpu(in, "reduce_scatter_async");
  check_cpu(out, "reduce_scatter_async");
  return run_async([this, in, out] { reduce_scatter_on(async_comm_, in, out); });
}

void MpiCommunicator::all_gather(const Tensor& in, const Tensor& out) {
  const std::string where = "all_gather";
  check_cpu(in, where);
  check_cpu(out, where);
  HYDRA_CHECK(out.numel() == in.numel() * size_ && out.dtype() == in.dtype())
      << where << " on '" << name_ << "': output of " << out.numel() << " elements for " << size_
      << " x " << in.numel();
  if (in.numel() == 0) return;
  MPI_Request req;
  const MPI_Datatype ty = mpi_type(in.dtype(), false, where);
  // `in` as this rank's slice of `out`: MPI forbids aliased buffers and names the case
  // MPI_IN_PLACE.
  const bool in_place = in.raw_data() == static_cast<char*>(out.raw_data()) +
                                             int64_t{rank_} * in.numel() *
                                                 static_cast<int64_t>(dtype_size(in.dtype()));
  check(MPI_Iallgather(in_place ? MPI_IN_PLACE : in.raw_data(), as_count(in.numel(), where), ty,
                       out.raw_data(), as_count(in.numel(), where), ty, comm_, &req),
        "MPI_Iallgather");
  wait(&req, "MPI_Iallgather", comm_);
}

void MpiCommunicator::reduce_scatter_on(MPI_Comm comm, const Tensor& in, const Tensor& out) const {
  const std::string where = "reduce_scatter";
  check_cpu(in, where);
  check_cpu(out, where);
  HYDRA_CHECK(in.numel() == out.numel() * size_ && out.dtype() == in.dtype())
      << where << " on '" << name_ << "': input of " << in.numel() << " elements for " << size_
      << " x " << out.numel();
  if (out.numel() == 0) return;
  MPI_Request req;
  check(MPI_Ireduce_scatter_block(in.raw_data(), out.raw_data(), as_count(out.numel(), where),
                                  mpi_type(in.dtype(), true, where), MPI_SUM, comm, &req),
        "MPI_Ireduce_scatter_block");
  wait(&req, "MPI_Ireduce_scatter_block", comm);
}

void MpiCommunicator::reduce_scatter(const Tensor& in, const Tensor& out) {
  reduce_scatter_on(comm_, in, out);
}

void MpiCommunicator::broadcast(const Tensor& t, int root) {
  const std::string where = "broadcast";
  check_cpu(t, where);
  HYDRA_CHECK(root >= 0 && root < size_)
      << where << ": root " << root << " outside [0, " << size_ << ")";
  if (t.numel() == 0 || size_ == 1) return;
  MPI_Request req;
  check(MPI_Ibcast(t.raw_data(), as_count(t.numel(), where), mpi_type(t.dtype(), false, where),
                   root, comm_, &req),
        "MPI_Ibcast");
  wait(&req, "MPI_Ibcast", comm_);
}

void MpiCommunicator::all_to_all_v(const Tensor& send, const std::vector<int64_t>& send_counts,
                                   const Tensor& recv, const std::vector<int64_t>& recv_counts) {
  const std::string where = "all_to_all_v";
  check_cpu(send, where);
  check_cpu(recv, where);
  HYDRA_CHECK(static_cast<int>(send_counts.size()) == size_ &&
              static_cast<int>(recv_counts.size()) == size_)
      << where << " on '" << name_ << "': counts for " << send_counts.size() << " and "
      << recv_counts.size() << " peers, communicator has " << size_;
  HYDRA_CHECK(send.dtype() == recv.dtype()) << where << ": send and receive dtypes differ";
  const int64_t row = send.dim() > 0 && send.size(0) > 0   ? send.numel() / send.size(0)
                      : recv.dim() > 0 && recv.size(0) > 0 ? recv.numel() / recv.size(0)
                                                           : 1;
  std::vector<int> sc(size_), sd(size_), rc(size_), rd(size_);
  int64_t so = 0, ro = 0;
  for (int p = 0; p < size_; ++p) {
    sc[p] = as_count(send_counts[p] * row, where);
    rc[p] = as_count(recv_counts[p] * row, where);
    sd[p] = as_count(so, where);
    rd[p] = as_count(ro, where);
    so += send_counts[p] * row;
    ro += recv_counts[p] * row;
  }
  HYDRA_CHECK(so == send.numel() && ro == recv.numel())
      << where << " on '" << name_ << "': counts cover " << so << " and " << ro
      << " elements, tensors hold " << send.numel() << " and " << recv.numel();
  const MPI_Datatype ty = mpi_type(send.dtype(), false, where);
  MPI_Request req;
  check(MPI_Ialltoallv(send.numel() ? send.raw_data() : nullptr, sc.data(), sd.data(), ty,
                       recv.numel() ? recv.raw_data() : nullptr, rc.data(), rd.data(), ty, comm_,
                       &req),
        "MPI_Ialltoallv");
  wait(&req, "MPI_Ialltoallv", comm_);
}

void MpiCommunicator::send_recv(const Tensor& send, int dest, const Tensor& recv, int src) {
  const std::string where = "send_recv";
  std::vector<MPI_Request> reqs;
  constexpr int kTag = 17;
  if (src >= 0 && recv.numel() > 0) {
    check_cpu(recv, where);
    reqs.emplace_back();
    check(MPI_Irecv(recv.raw_data(), as_count(recv.numel(), where),
                    mpi_type(recv.dtype(), false, where), src, kTag, comm_, &reqs.back()),
          "MPI_Irecv");
  }
  if (dest >= 0 && send.numel() > 0) {
    check_cpu(send, where);
    reqs.emplace_back();
    check(MPI_Issend(send.raw_data(), as_count(send.numel(), where),
                     mpi_type(send.dtype(), false, where), dest, kTag, comm_, &reqs.back()),
          "MPI_Issend");
  }
  // The receive first, to check its size: a message shorter than the buffer is a bug in the caller
  // (the ranks disagree on a shape) that MPI would accept and NCCL would hang on.
  if (src >= 0 && recv.numel() > 0) {
    MPI_Status status;
    try {
      wait(&reqs[0], "MPI_Irecv", comm_, true, &status);
    } catch (...) {
      for (std::size_t j = 1; j < reqs.size(); ++j) {
        MPI_Cancel(&reqs[j]);
        MPI_Request_free(&reqs[j]);
      }
      throw;
    }
    reqs.erase(reqs.begin());
    int got = 0;
    MPI_Get_count(&status, mpi_type(recv.dtype(), false, where), &got);
    HYDRA_CHECK(got == recv.numel())
        << "rank " << process_info().rank << ": send_recv on '" << name_ << "': received " << got
        << " elements from rank " << src << ", expected " << recv.numel()
        << " (the ranks disagree on the tensor's shape)";
  }
  wait_all(reqs, "MPI_Issend/MPI_Irecv");
}

void MpiCommunicator::barrier() {
  MPI_Request req;
  check(MPI_Ibarrier(comm_, &req), "MPI_Ibarrier");
  wait(&req, "MPI_Ibarrier", comm_);
}

std::unique_ptr<MpiCommunicator> MpiCommunicator::split_mpi(int color, int key,
                                                            std::string name) const {
  MPI_Comm out = MPI_COMM_NULL;
  check(MPI_Comm_split(comm_, color, key, &out), "MPI_Comm_split");
  auto c = std::make_unique<MpiCommunicator>(out, std::move(name));
  c->set_timeout(timeout_);
  return c;
}

std::unique_ptr<Communicator> MpiCommunicator::split(int color, int key, std::string name) const {
  return split_mpi(color, key, std::move(name));
}

}  // namespace hydra::parallel
