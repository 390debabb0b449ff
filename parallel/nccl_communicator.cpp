#include "parallel/nccl_communicator.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include "autograd/cuda_context.h"
#include "autograd/ops.h"
#include "base/check.h"
#include "parallel/runtime.h"

namespace hydra::parallel {

struct NcclCommunicator::Impl {
  ncclComm_t comm = nullptr;
  void* stream = nullptr;   // this communicator's own stream
  void* compute = nullptr;  // the device's compute stream
};

namespace {

ncclDataType_t nccl_type(DType t, const std::string& where) {
  switch (t) {
    case DType::kF32:
      return ncclFloat32;
    case DType::kF64:
      return ncclFloat64;
    case DType::kBF16:
      return ncclBfloat16;
    case DType::kI32:
      return ncclInt32;
    case DType::kI64:
      return ncclInt64;
    default:
      HYDRA_FAIL() << where << ": dtype " << dtype_name(t) << " is not supported over NCCL";
  }
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return ncclSum;
    case ReduceOp::kMax:
      return ncclMax;
    case ReduceOp::kMin:
      return ncclMin;
  }
  return ncclSum;
}

cudaStream_t as_cuda(void* s) { return static_cast<cudaStream_t>(s); }

// Communicators' streams are never destroyed: the caching allocator records tensors' last uses on
// them (record_stream) and may record events there after a communicator is gone. A destroyed
// communicator's stream goes back to a per-device pool for the next one.
std::mutex g_stream_mu;
std::map<int, std::vector<cudaStream_t>> g_free_streams;

cudaStream_t take_stream(int device) {
  std::lock_guard<std::mutex> lock(g_stream_mu);
  auto& free = g_free_streams[device];
  if (!free.empty()) {
    cudaStream_t s = free.back();
    free.pop_back();
    return s;
  }
  // The highest priority: while the backward's kernels fill the GPU, the block scheduler gives the
  // SMs that free up to the communication kernels first, so that they run beside the backward
  // instead of waiting for a gap between its kernels.
  int least = 0, greatest = 0;
  HYDRA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest) == cudaSuccess)
      << "rank " << process_info().rank
      << ": cudaDeviceGetStreamPriorityRange failed on cuda:" << device;
  cudaStream_t s = nullptr;
  HYDRA_CHECK(cudaStreamCreateWithPriority(&s, cudaStreamNonBlocking, greatest) == cudaSuccess)
      << "rank " << process_info().rank << ": cudaStreamCreate failed on cuda:" << device;
  return s;
}

void give_back_stream(int device, cudaStream_t s) {
  std::lock_guard<std::mutex> lock(g_stream_mu);
  g_free_streams[device].push_back(s);
}

// ncclGroupStart now; ncclGroupEnd by end(), or by the destructor when an exception leaves the
// group early (a group left open would turn every later NCCL call of this thread into a silent
// no-op).
class NcclGroup {
 public:
  NcclGroup() : started_(ncclGroupStart()) {}
  NcclGroup(const NcclGroup&) = delete;
  NcclGroup& operator=(const NcclGroup&) = delete;
  ~NcclGroup() {
    if (started_ == ncclSuccess && !ended_) ncclGroupEnd();
  }
  ncclResult_t started() const { return started_; }
  ncclResult_t end() {
    ended_ = true;
    return ncclGroupEnd();
  }

 private:
  ncclResult_t started_;
  bool ended_ = false;
};

// Waiting for NCCL or the GPU: spin first (work about to finish, or an idle stream whose event the
// GPU has not seen yet, would otherwise cost a whole sleep; NCCL finishes a non-blocking call on a
// thread of its own, usually within tens of microseconds), then sleep between polls.
void backoff(int spins) {
  if (spins < 2000) {
    std::this_thread::yield();
  } else {
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

class NcclWork final : public Work {
 public:
  NcclWork(std::shared_ptr<CudaEvent> done, void* compute)
      : done_(std::move(done)), compute_(compute) {}
  void wait() override { done_->wait_on(compute_); }  // the compute stream waits; the host does not

 private:
  std::shared_ptr<CudaEvent> done_;
  void* compute_;
};

}  // namespace

// The communicator is non-blocking (ncclConfig_t::blocking = 0): a call may return ncclInProgress
// while NCCL connects to peers in the background, and the next use must wait for it (await_ready),
// so that a peer that never comes is a timeout with a message, not a host blocked forever in
// ncclGroupEnd.
#define HYDRA_NCCL_CHECK(call)                                                                \
  do {                                                                                        \
    const ncclResult_t r_ = (call);                                                           \
    if (r_ != ncclSuccess && r_ != ncclInProgress) {                                          \
      HYDRA_FAIL() << "rank " << process_info().rank << ": " << #call << " on communicator '" \
                   << name() << "' failed: " << ncclGetErrorString(r_) << " ("                \
                   << ncclGetLastError(impl_->comm) << ")";                                   \
    }                                                                                         \
  } while (0)

// A call, then the wait until NCCL has queued its work on the stream (or failed, or the deadline
// passed).
#define HYDRA_NCCL_CALL(call) \
  do {                        \
    HYDRA_NCCL_CHECK(call);   \
    await_ready(#call);       \
  } while (0)

std::string NcclCommunicator::library_version() {
  int v = 0;
  if (ncclGetVersion(&v) != ncclSuccess) return "unknown";
  // NCCL >= 2.9 encodes major * 10000 + minor * 100 + patch.
  return std::to_string(v / 10000) + "." + std::to_string(v / 100 % 100) + "." +
         std::to_string(v % 100);
}

NcclCommunicator::NcclCommunicator(std::unique_ptr<MpiCommunicator> bootstrap, int device)
    : bootstrap_(std::move(bootstrap)), device_(device), impl_(std::make_unique<Impl>()) {
  timeout_ = bootstrap_->timeout();
  HYDRA_CHECK(cudaSetDevice(device_) == cudaSuccess)
      << "rank " << process_info().rank << ": cudaSetDevice(" << device_ << ") failed";
  ncclUniqueId id{};
  static_assert(sizeof(ncclUniqueId) % 4 == 0);
  Tensor buf = zeros({static_cast<int64_t>(sizeof(ncclUniqueId) / 4)}, DType::kI32);
  if (bootstrap_->rank() == 0) {
    HYDRA_NCCL_CHECK(ncclGetUniqueId(&id));
    std::memcpy(buf.raw_data(), &id, sizeof(id));
  }
  bootstrap_->broadcast(buf, 0);
  std::memcpy(&id, buf.raw_data(), sizeof(id));
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  HYDRA_NCCL_CALL(
      ncclCommInitRankConfig(&impl_->comm, bootstrap_->size(), id, bootstrap_->rank(), &config));
  // Its own stream: the ranks issue work on several communicators (a bucket's all-reduce from a
  // gradient hook, a sequence-parallel exchange) in orders that may differ between ranks; on one
  // shared stream the kernels of two communicators would wait for each other across the GPUs.
  impl_->stream = take_stream(device_);
  impl_->compute = cuda_compute_stream(device_);
}

void NcclCommunicator::await_ready(const char* call) {
  const auto deadline = std::chrono::steady_clock::now() + timeout_;
  for (int spins = 0;; ++spins) {
    ncclResult_t state = ncclInProgress;
    const ncclResult_t r = ncclCommGetAsyncError(impl_->comm, &state);
    if (r == ncclSuccess && state == ncclSuccess) return;
    if (r != ncclSuccess || state != ncclInProgress) {
      const std::string detail = ncclGetLastError(impl_->comm);
      ncclCommAbort(impl_->comm);
      impl_->comm = nullptr;
      HYDRA_FAIL() << "rank " << process_info().rank << ": " << call << " on communicator '"
                   << name() << "' failed: " << ncclGetErrorString(r != ncclSuccess ? r : state)
                   << " (" << detail << ")";
    }
    if (std::chrono::steady_clock::now() > deadline) abort_after_timeout(call);
    backoff(spins);
  }
}

void NcclCommunicator::abort_after_timeout(const std::string& what) {
  ncclCommAbort(impl_->comm);
  impl_->comm = nullptr;
  HYDRA_FAIL()
      << "rank " << process_info().rank << ": " << what << " on communicator '" << name()
      << "' did not complete within " << timeout_.count()
      << " s"
      // The ranks that timed out too report to each other over MPI: the silent ones are named.
      << bootstrap_->roll_call();
}

void NcclCommunicator::set_timeout(std::chrono::seconds t) {
  timeout_ = t;
  bootstrap_->set_timeout(t);
}

NcclCommunicator::~NcclCommunicator() {
  if (impl_ == nullptr) return;
  cudaSetDevice(device_);
  // An aborted communicator's stream may still hold a kernel that waited for a peer: not reused.
  bool reuse_stream = impl_->comm != nullptr;
  if (impl_->comm != nullptr) {
    // Finalize flushes the queued work; a peer that never comes would hold it forever: abort then.
    ncclResult_t state = ncclCommFinalize(impl_->comm);
    const auto deadline = std::chrono::steady_clock::now() + timeout_;
    while (state == ncclInProgress && std::chrono::steady_clock::now() <= deadline) {
      std::this_thread::sleep_for(std::chrono::microseconds(100));
      if (ncclCommGetAsyncError(impl_->comm, &state) != ncclSuccess) break;
    }
    if (state == ncclSuccess) {
      ncclCommDestroy(impl_->comm);
    } else {
      std::fprintf(
          stderr,
          "rank %d: NCCL communicator '%s' did not finish its work within %lld s; aborted\n",
          process_info().rank, name().c_str(), static_cast<long long>(timeout_.count()));
      ncclCommAbort(impl_->comm);
      reuse_stream = false;
    }
  }
  if (impl_->stream != nullptr && reuse_stream) give_back_stream(device_, as_cuda(impl_->stream));
}

void NcclCommunicator::check_async() {
  HYDRA_CHECK(impl_->comm != nullptr)
      << "rank " << process_info().rank << ": NCCL communicator '" << name()
      << "' was aborted after an earlier error or timeout";
  ncclResult_t async = ncclSuccess;
  ncclCommGetAsyncError(impl_->comm, &async);
  if (async == ncclSuccess || async == ncclInProgress) return;
  // NCCL's rule after an asynchronous error: abort, so that no kernel keeps waiting on the stream.
  const std::string detail = ncclGetLastError(impl_->comm);
  ncclCommAbort(impl_->comm);
  impl_->comm = nullptr;
  HYDRA_FAIL() << "rank " << process_info().rank << ": NCCL on communicator '" << name()
               << "' failed asynchronously: " << ncclGetErrorString(async) << " (" << detail << ")";
}

void NcclCommunicator::begin(const std::vector<Tensor>& tensors) {
  for (const Tensor& t : tensors) {
    HYDRA_CHECK(t.device() == Device::cuda(device_))
        << "NCCL communicator '" << name() << "' on cuda:" << device_ << " got a tensor on "
        << t.device().str();
    HYDRA_CHECK(t.is_contiguous())
        << "NCCL communicator '" << name() << "': tensor must be contiguous";
  }
  check_async();
  cuda_stream_wait(impl_->stream, impl_->compute);
}

void NcclCommunicator::end(const std::vector<Tensor>& tensors) {
  for (const Tensor& t : tensors)
    if (t.numel() > 0) cuda_record_stream(t.storage()->data(), device_, impl_->stream);
  cuda_stream_wait(impl_->compute, impl_->stream);
}

// A group of one rank (an expert's replicas when ep = world, say) moves nothing: its reductions are
// the identity and its gathers a copy on the compute stream. NCCL would still run a kernel per call
// beside the backward.

void NcclCommunicator::all_reduce(const Tensor& t, ReduceOp op) {
  if (t.numel() == 0 || size() == 1) return;
  begin({t});
  HYDRA_NCCL_CALL(ncclAllReduce(t.raw_data(), t.raw_data(), t.numel(),
                                nccl_type(t.dtype(), "all_reduce"), nccl_op(op), impl_->comm,
                                as_cuda(impl_->stream)));
  end({t});
}

std::unique_ptr<Work> NcclCommunicator::all_reduce_async(const Tensor& t) {
  auto done = std::make_shared<CudaEvent>();
  if (t.numel() > 0 && size() > 1) {
    begin({t});
    HYDRA_NCCL_CALL(ncclAllReduce(t.raw_data(), t.raw_data(), t.numel(),
                                  nccl_type(t.dtype(), "all_reduce"), ncclSum, impl_->comm,
                                  as_cuda(impl_->stream)));
    cuda_record_stream(t.storage()->data(), device_, impl_->stream);
  }
  done->record(
      impl_->stream);  // the compute stream waits for it only in wait(): overlap until then
  return std::make_unique<NcclWork>(std::move(done), impl_->compute);
}

void NcclCommunicator::all_gather(const Tensor& in, const Tensor& out) {
  HYDRA_CHECK(out.numel() == in.numel() * size() && out.dtype() == in.dtype())
      << "all_gather on '" << name() << "': output of " << out.numel() << " elements for " << size()
      << " x " << in.numel();
  if (in.numel() == 0) return;
  if (size() == 1) {
    if (in.raw_data() != out.raw_data()) Tensor(out).copy_(in.reshape(out.shape()));
    return;
  }
  begin({in, out});  // in place (in is out's slice rank) is NCCL's own in-place form
  HYDRA_NCCL_CALL(ncclAllGather(in.raw_data(), out.raw_data(), in.numel(),
                                nccl_type(in.dtype(), "all_gather"), impl_->comm,
                                as_cuda(impl_->stream)));
  end({in, out});
}

void NcclCommunicator::reduce_scatter(const Tensor& in, const Tensor& out) {
  HYDRA_CHECK(in.numel() == out.numel() * size() && out.dtype() == in.dtype())
      << "reduce_scatter on '" << name() << "': input of " << in.numel() << " elements for "
      << size() << " x " << out.numel();
  if (out.numel() == 0) return;
  if (size() == 1) {
    Tensor(out).copy_(in.reshape(out.shape()));
    return;
  }
  begin({in, out});
  HYDRA_NCCL_CALL(ncclReduceScatter(in.raw_data(), out.raw_data(), out.numel(),
                                    nccl_type(in.dtype(), "reduce_scatter"), ncclSum, impl_->comm,
                                    as_cuda(impl_->stream)));
  end({in, out});
}

std::unique_ptr<Work> NcclCommunicator::reduce_scatter_async(const Tensor& in, const Tensor& out) {
  HYDRA_CHECK(in.numel() == out.numel() * size() && out.dtype() == in.dtype())
      << "reduce_scatter_async on '" << name() << "': input of " << in.numel() << " elements for "
      << size() << " x " << out.numel();
  auto done = std::make_shared<CudaEvent>();
  if (out.numel() > 0 && size() == 1) {
    Tensor(out).copy_(in.reshape(out.shape()));  // on the compute stream: done when wait() returns
    done->record(impl_->compute);
    return std::make_unique<NcclWork>(std::move(done), impl_->compute);
  }
  if (out.numel() > 0) {
    begin({in, out});
    HYDRA_NCCL_CALL(ncclReduceScatter(in.raw_data(), out.raw_data(), out.numel(),
                                      nccl_type(in.dtype(), "reduce_scatter"), ncclSum, impl_->comm,
                                      as_cuda(impl_->stream)));
    cuda_record_stream(in.storage()->data(), device_, impl_->stream);
    cuda_record_stream(out.storage()->data(), device_, impl_->stream);
  }
  done->record(
      impl_->stream);  // the compute stream waits for it only in wait(): overlap until then
  return std::make_unique<NcclWork>(std::move(done), impl_->compute);
}

void NcclCommunicator::broadcast(const Tensor& t, int root) {
  HYDRA_CHECK(root >= 0 && root < size())
      << "broadcast: root " << root << " outside [0, " << size() << ")";
  if (t.numel() == 0 || size() == 1) return;
  begin({t});
  HYDRA_NCCL_CALL(ncclBroadcast(t.raw_data(), t.raw_data(), t.numel(),
                                nccl_type(t.dtype(), "broadcast"), root, impl_->comm,
                                as_cuda(impl_->stream)));
  end({t});
}

void NcclCommunicator::all_to_all_v(const Tensor& send, const std::vector<int64_t>& send_counts,
                                    const Tensor& recv, const std::vector<int64_t>& recv_counts) {
  const int n = size();
  HYDRA_CHECK(static_cast<int>(send_counts.size()) == n &&
              static_cast<int>(recv_counts.size()) == n)
      << "all_to_all_v on '" << name() << "': counts for " << send_counts.size() << " and "
      << recv_counts.size() << " peers, communicator has " << n;
  HYDRA_CHECK(send.dtype() == recv.dtype()) << "all_to_all_v: send and receive dtypes differ";
  const int64_t row = send.dim() > 0 && send.size(0) > 0   ? send.numel() / send.size(0)
                      : recv.dim() > 0 && recv.size(0) > 0 ? recv.numel() / recv.size(0)
                                                           : 1;
  int64_t so = 0, ro = 0;
  for (int p = 0; p < n; ++p) {
    so += send_counts[p] * row;
    ro += recv_counts[p] * row;
  }
  HYDRA_CHECK(so == send.numel() && ro == recv.numel())
      << "all_to_all_v on '" << name() << "': counts cover " << so << " and " << ro
      << " elements, tensors hold " << send.numel() << " and " << recv.numel();
  begin({send, recv});
  const ncclDataType_t ty = nccl_type(send.dtype(), "all_to_all_v");
  const std::size_t es = dtype_size(send.dtype());
  auto* sp = static_cast<char*>(send.numel() ? send.raw_data() : nullptr);
  auto* rp = static_cast<char*>(recv.numel() ? recv.raw_data() : nullptr);
  {
    NcclGroup group;
    HYDRA_NCCL_CHECK(group.started());
    so = ro = 0;
    for (int p = 0; p < n; ++p) {
      if (send_counts[p] > 0)
        HYDRA_NCCL_CHECK(ncclSend(sp + so * es, send_counts[p] * row, ty, p, impl_->comm,
                                  as_cuda(impl_->stream)));
      if (recv_counts[p] > 0)
        HYDRA_NCCL_CHECK(ncclRecv(rp + ro * es, recv_counts[p] * row, ty, p, impl_->comm,
                                  as_cuda(impl_->stream)));
      so += send_counts[p] * row;
      ro += recv_counts[p] * row;
    }
    HYDRA_NCCL_CALL(group.end());
  }
  end({send, recv});
}

void NcclCommunicator::send_recv(const Tensor& send, int dest, const Tensor& recv, int src) {
  std::vector<Tensor> used;
  if (dest >= 0 && send.numel() > 0) used.push_back(send);
  if (src >= 0 && recv.numel() > 0) used.push_back(recv);
  if (used.empty()) return;
  const bool sending = dest >= 0 && send.numel() > 0, receiving = src >= 0 && recv.numel() > 0;
  const ncclDataType_t send_type = sending ? nccl_type(send.dtype(), "send") : ncclFloat32;
  const ncclDataType_t recv_type = receiving ? nccl_type(recv.dtype(), "recv") : ncclFloat32;
  begin(used);
  {
    NcclGroup group;
    HYDRA_NCCL_CHECK(group.started());
    if (sending)
      HYDRA_NCCL_CHECK(ncclSend(send.raw_data(), send.numel(), send_type, dest, impl_->comm,
                                as_cuda(impl_->stream)));
    if (receiving)
      HYDRA_NCCL_CHECK(ncclRecv(recv.raw_data(), recv.numel(), recv_type, src, impl_->comm,
                                as_cuda(impl_->stream)));
    HYDRA_NCCL_CALL(group.end());
  }
  end(used);
}

void NcclCommunicator::barrier() {
  Tensor t = zeros({1}, DType::kF32, device());
  all_reduce(t, ReduceOp::kSum);
  synchronize();
}

void NcclCommunicator::synchronize() {
  CudaEvent e;
  e.record(impl_->stream);
  const auto deadline = std::chrono::steady_clock::now() + timeout_;
  for (int spins = 0; !e.done(); ++spins) {
    check_async();
    if (std::chrono::steady_clock::now() > deadline) abort_after_timeout("NCCL work");
    backoff(spins);
  }
}

std::unique_ptr<Communicator> NcclCommunicator::split(int color, int key, std::string name) const {
  return std::make_unique<NcclCommunicator>(bootstrap_->split_mpi(color, key, std::move(name)),
                                            device_);
}

}  // namespace hydra::parallel
