#include "parallel/reducer.h"

#include <algorithm>
#include <chrono>
#include <memory>

#include "autograd/cuda_context.h"
#include "autograd/grad_mode.h"
#include "autograd/node.h"
#include "autograd/ops.h"

namespace hydra::parallel {

GradientReducer::GradientReducer(std::vector<ReducedParam> params, double bucket_mb, bool shard)
    : params_(std::move(params)), shard_(shard) {
  HYDRA_CHECK(bucket_mb > 0) << "parallel.bucket_mb = " << bucket_mb << " must be > 0";
  const auto limit = static_cast<int64_t>(bucket_mb * 1024 * 1024);
  bucket_of_.assign(params_.size(), -1);
  seen_.assign(params_.size(), false);
  // Reverse registration order: the last layers' gradients are ready first.
  for (int i = static_cast<int>(params_.size()) - 1; i >= 0; --i) {
    const ReducedParam& p = params_[i];
    HYDRA_CHECK(p.group != nullptr) << "reducer: parameter " << p.name << " has no group";
    if (p.sparse) continue;
    const int64_t bytes =
        p.tensor.numel() * static_cast<int64_t>(dtype_size(p.tensor.grad_dtype()));
    Bucket* open = nullptr;
    for (auto it = buckets_.rbegin(); it != buckets_.rend(); ++it)
      if (it->group == p.group && it->dtype == p.tensor.grad_dtype() &&
          it->device == p.tensor.device()) {
        open = &*it;
        break;
      }
    if (open == nullptr ||
        (open->numel > 0 && (open->numel * int64_t(dtype_size(open->dtype)) + bytes) > limit)) {
      buckets_.emplace_back();
      open = &buckets_.back();
      open->group = p.group;
      open->dtype = p.tensor.grad_dtype();
      open->device = p.tensor.device();
    }
    open->params.push_back(i);
    open->offsets.push_back(open->numel);
    open->numel += p.tensor.numel();
    bucket_of_[i] = static_cast<int>(open - buckets_.data());
  }
  had_.assign(params_.size(), 0.0);
  owned_.assign(params_.size(), ParamShard{});
  runs_.assign(params_.size(), RowRun{});
  slice_pos_.assign(params_.size(), 0);
  if (shard_) {
    // Rank r of a bucket's group owns [r * slice, (r + 1) * slice) of the flat bucket.
    for (Bucket& b : buckets_) {
      const int64_t size = b.group->size(), r = b.group->rank();
      b.slice = (b.numel + size - 1) / size;
      const int64_t first = r * b.slice, last = first + b.slice;
      for (std::size_t k = 0; k < b.params.size(); ++k) {
        const int i = b.params[k];
        const int64_t off = b.offsets[k], n = params_[i].tensor.numel();
        const int64_t lo = std::clamp<int64_t>(first - off, 0, n),
                      hi = std::clamp<int64_t>(last - off, 0, n);
        owned_[i].lo = lo;
        owned_[i].hi = std::max(lo, hi);
        slice_pos_[i] = off + lo - first;
      }
    }
    // Row-sparse parameters: rank r of the group owns rows [r * slice, (r + 1) * slice).
    for (std::size_t i = 0; i < params_.size(); ++i) {
      if (!params_[i].sparse) continue;
      const Tensor& t = params_[i].tensor;
      HYDRA_CHECK(t.dim() == 2) << "reducer: row-sparse parameter " << params_[i].name
                                << " is not 2-D";
      const int64_t rows = t.size(0), cols = t.size(1), size = params_[i].group->size();
      const int64_t slice = (rows + size - 1) / size;
      const int64_t r0 = std::min(rows, params_[i].group->rank() * slice),
                    r1 = std::min(rows, r0 + slice);
      owned_[i].lo = r0 * cols;
      owned_[i].hi = r1 * cols;
    }
  }
  for (const ReducedParam& p : params_)
    if (!p.sparse && std::find(groups_.begin(), groups_.end(), p.group) == groups_.end())
      groups_.push_back(p.group);
  for (std::size_t i = 0; i < params_.size(); ++i) {
    const int index = static_cast<int>(i);
    hook_ids_.push_back(
        params_[i].tensor.add_grad_ready_hook([this, index](const Tensor&) { on_ready(index); }));
  }
}

GradientReducer::~GradientReducer() {
  for (std::size_t i = 0; i < params_.size(); ++i)
    params_[i].tensor.remove_grad_ready_hook(hook_ids_[i]);
}

void GradientReducer::prepare() {
  // Each bucket's storage now (after the forward, so it does not sit beside the activations), and
  // every parameter without a gradient yet writes its gradient straight into its place there.
  for (Bucket& b : buckets_) {
    b.ready = 0;
    b.started = false;
    b.work.reset();
    const int64_t padded = shard_ ? b.slice * b.group->size() : b.numel;
    b.flat = Tensor::empty({padded}, b.dtype, b.device);
    if (padded > b.numel) b.flat.narrow(0, b.numel, padded - b.numel).zero_();
    for (std::size_t k = 0; k < b.params.size(); ++k) {
      const Tensor& t = params_[b.params[k]].tensor;
      t.set_grad_destination(t.grad().defined()
                                 ? Tensor()
                                 : b.flat.narrow(0, b.offsets[k], t.numel()).view(t.shape()));
    }
  }
  std::fill(seen_.begin(), seen_.end(), false);
  next_ = 0;
  stats_ = ReducerStats{};
  active_ = true;
}

void GradientReducer::on_ready(int param) {
  if (!active_) return;
  const int b = bucket_of_[param];
  if (b < 0) return;  // row-sparse: merged in finish()
  HYDRA_CHECK(!buckets_[b].started) << "parameter " << params_[param].name
                                    << " received more gradient after its bucket was reduced (is "
                                       "it used again after its gradient was "
                                       "complete?)";
  if (seen_[param]) return;
  seen_[param] = true;
  ++buckets_[b].ready;
  start_ready_buckets();
}

void GradientReducer::start_ready_buckets() {
  while (next_ < buckets_.size() &&
         buckets_[next_].ready == static_cast<int>(buckets_[next_].params.size())) {
    start(buckets_[next_]);
    ++stats_.early;
    ++next_;
  }
}

void GradientReducer::start(Bucket& b) {
  NoGradGuard ng;
  flush_gradient_conversions();  // the bucket's gradients converted in place before it is read
  for (std::size_t k = 0; k < b.params.size(); ++k) {
    const int i = b.params[k];
    const Tensor& t = params_[i].tensor;
    t.set_grad_destination(Tensor());
    const Tensor g = t.grad();
    had_[i] = g.defined() ? 1.0 : 0.0;
    Tensor slot = b.flat.narrow(0, b.offsets[k], t.numel());
    const bool in_place =
        g.defined() && g.storage() == b.flat.storage() && g.offset() == slot.offset();
    if (in_place) continue;  // written there by the backward
    if (g.defined()) {       // accumulated over earlier micro-batches, or set by hand: copied
      slot.copy_(g.reshape({-1}));
      ++stats_.copied;
    } else {
      slot.zero_();
    }
  }
  if (shard_ && b.group->size() == 1) {
    b.shard =
        b.flat.narrow(0, 0, b.slice);  // one rank: its slice is the whole bucket, nothing to move
  } else if (shard_) {
    b.shard = Tensor::empty({b.slice}, b.dtype, b.device);
    b.work = b.group->reduce_scatter_async(b.flat, b.shard);
  } else {
    b.work = b.group->all_reduce_async(b.flat);
  }
  b.started = true;
  ++stats_.buckets;
  stats_.bytes += double(b.numel * int64_t(dtype_size(b.dtype)));
}

void GradientReducer::reduce_sparse(int param) {
  NoGradGuard ng;
  const ReducedParam& p = params_[param];
  Communicator& c = *p.group;
  const int64_t cols = p.tensor.size(1);
  Tensor rows = zeros({0}, DType::kI64, p.tensor.device()),
         values = zeros({0, cols}, p.tensor.grad_dtype(), p.tensor.device());
  if (const auto& sg = p.tensor.sparse_grad()) {
    rows = sg->rows;
    values = sg->values;
  } else if (p.tensor.grad().defined()) {
    HYDRA_FAIL() << "reducer: " << p.name << " was declared row-sparse but got a dense gradient";
  }
  // Pad every rank's rows to the longest, gather, then merge the real rows (rank order:
  // deterministic).
  const int64_t mine = rows.numel();
  const int64_t longest = static_cast<int64_t>(c.all_reduce_host(double(mine), ReduceOp::kMax));
  Tensor counts = all_gather(full({1}, double(mine), DType::kF64, p.tensor.device()).detach(), c);
  Tensor prow = full({longest}, -1.0, DType::kI64, p.tensor.device());
  Tensor pval = zeros({longest, cols}, p.tensor.grad_dtype(), p.tensor.device());
  if (mine > 0) {
    prow.narrow(0, 0, mine).copy_(rows);
    pval.narrow(0, 0, mine).copy_(values);
  }
  Tensor all_rows = Tensor::empty({longest * c.size()}, DType::kI64, p.tensor.device());
  Tensor all_vals =
      Tensor::empty({longest * c.size(), cols}, p.tensor.grad_dtype(), p.tensor.device());
  c.all_gather(prow, all_rows);
  c.all_gather(pval, all_vals);
  const std::vector<double> cnt = counts.cpu().to_vector<double>();
  std::vector<Tensor> rs, vs;
  for (int q = 0; q < c.size(); ++q) {
    const auto n = static_cast<int64_t>(cnt[q]);
    if (n == 0) continue;
    rs.push_back(all_rows.narrow(0, q * longest, n));
    vs.push_back(all_vals.narrow(0, q * longest, n));
  }
  p.tensor.set_sparse_grad(nullptr);
  if (!rs.empty()) accumulate_sparse_grad(p.tensor, concat(rs, 0), concat(vs, 0));
}

void GradientReducer::finish() {
  HYDRA_CHECK(active_) << "reducer: finish() without prepare()";
  // The exposed communication. On a GPU: device time on the compute stream from the end of the
  // backward's work to the point where it may go on (every bucket reduced); the host's wait would
  // also count the backward's kernels still queued. On the CPU: the host's wait.
  void* stream = nullptr;
  std::unique_ptr<CudaEvent> backward_done, reduced;
  if (!buckets_.empty() && buckets_.front().device.is_cuda()) {
    stream = cuda_compute_stream(buckets_.front().device.index);
    backward_done = std::make_unique<CudaEvent>();
    backward_done->record(stream);
  }
  const auto t0 = std::chrono::steady_clock::now();
  // Buckets not started yet (a parameter got no gradient, or the backward ended): start them in
  // order.
  for (; next_ < buckets_.size(); ++next_) start(buckets_[next_]);
  active_ = false;  // the sparse merge below runs gradient hooks again
  for (Bucket& b : buckets_)
    if (b.work) b.work->wait();
  if (stream != nullptr) {
    reduced = std::make_unique<CudaEvent>();
    reduced->record(stream);
  }
  for (Communicator* g : groups_) g->synchronize();
  if (reduced) {
    reduced->synchronize();
    stats_.exposed_ms = reduced->ms_since(*backward_done);
  } else {
    stats_.exposed_ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  }
  // How many ranks of its group had a gradient for each parameter: a parameter no rank touched this
  // step keeps no gradient (as in one process, where the optimizer then leaves it alone). One small
  // host all-reduce per group, groups in the order of first appearance (the same on every rank).
  for (Communicator* g : groups_) {
    std::vector<double> flags;
    for (std::size_t i = 0; i < params_.size(); ++i)
      if (params_[i].group == g && bucket_of_[i] >= 0) flags.push_back(had_[i]);
    g->all_reduce_host(flags, ReduceOp::kSum);
    std::size_t k = 0;
    for (std::size_t i = 0; i < params_.size(); ++i)
      if (params_[i].group == g && bucket_of_[i] >= 0) had_[i] = flags[k++];
  }
  NoGradGuard ng;
  for (Bucket& b : buckets_) {
    if (shard_) {  // the gradients live in the slices now; the local sums are not wanted
      for (const int i : b.params) params_[i].tensor.set_grad(Tensor());
      b.flat = Tensor();
      continue;
    }
    for (std::size_t k = 0; k < b.params.size(); ++k) {
      const Tensor& t = params_[b.params[k]].tensor;
      t.set_grad(had_[b.params[k]] > 0 ? b.flat.narrow(0, b.offsets[k], t.numel()).view(t.shape())
                                       : Tensor());
    }
  }
  for (std::size_t i = 0; i < params_.size(); ++i)
    if (params_[i].sparse) {
      reduce_sparse(static_cast<int>(i));
      if (shard_) find_run(static_cast<int>(i));
    }
}

void GradientReducer::find_run(int i) {
  RowRun& run = runs_[i];
  run = RowRun{};
  const Tensor& t = params_[i].tensor;
  const auto& sg = t.sparse_grad();
  if (!sg || sg->rows.numel() == 0) return;
  const int64_t cols = t.size(1), r0 = owned_[i].lo / cols, r1 = owned_[i].hi / cols;
  const std::vector<int64_t> rows =
      sg->rows.cpu().to_vector<int64_t>();  // merged: unique, ascending
  run.first = std::lower_bound(rows.begin(), rows.end(), r0) - rows.begin();
  run.last = std::lower_bound(rows.begin(), rows.end(), r1) - rows.begin();
  if (run.last == run.first) return;
  std::vector<int64_t> local(rows.begin() + run.first, rows.begin() + run.last);
  for (int64_t& r : local) r -= r0;
  run.local = tensor(local, {run.last - run.first}).to(t.device());
}

}  // namespace hydra::parallel

namespace hydra::parallel {

ParamShard GradientReducer::shard(int i) const {
  HYDRA_CHECK(is_sharded(i)) << "reducer: " << params_[i].name << " is not sharded";
  ParamShard out = owned_[i];
  if (params_[i].sparse) {
    const RowRun& run = runs_[i];
    if (run.local.defined()) {
      out.rows = run.local;
      out.grad = params_[i].tensor.sparse_grad()->values.narrow(0, run.first, run.last - run.first);
    }
    return out;
  }
  const Bucket& b = buckets_[bucket_of_[i]];
  if (had_[i] > 0 && out.hi > out.lo && b.shard.defined())
    out.grad = b.shard.narrow(0, slice_pos_[i], out.hi - out.lo);
  return out;
}

void GradientReducer::all_gather_params() {
  HYDRA_CHECK(shard_) << "reducer: all_gather_params() without ZeRO-1 sharding";
  NoGradGuard ng;
  const auto t0 = std::chrono::steady_clock::now();
  for (Bucket& b : buckets_) {
    // had_ is the same on every rank (summed over the group in finish()): every rank skips alike.
    bool changed = false;
    for (const int i : b.params) changed = changed || had_[i] > 0;
    if (!changed || b.group->size() == 1) continue;  // one rank updated the whole parameter itself
    const int64_t size = b.group->size(), first = b.group->rank() * b.slice;
    if (b.params.size() == 1 && b.slice * size == b.numel) {
      // One parameter fills the bucket (every large weight): it is the gather's output, and its
      // owned slice, updated by the optimizer, the input. Nothing is copied.
      const Tensor& t = params_[b.params[0]].tensor;
      if (t.is_contiguous()) {
        const Tensor flat = t.detach().reshape({-1});
        b.group->all_gather(flat.narrow(0, first, b.slice), flat);
        t.storage()->bump_version();
        ++stats_.gathered_in_place;
        continue;
      }
    }
    // Several parameters: packed into this rank's slice, gathered, unpacked. The owned pieces tile
    // the slice; only the padding past the bucket's end needs zeros.
    Tensor mine = Tensor::empty({b.slice}, b.dtype, b.device);
    if (first + b.slice > b.numel) {
      const int64_t pad_from = std::max<int64_t>(0, b.numel - first);
      mine.narrow(0, pad_from, b.slice - pad_from).zero_();
    }
    for (const int i : b.params) {
      const ParamShard& o = owned_[i];
      if (o.hi > o.lo)
        mine.narrow(0, slice_pos_[i], o.hi - o.lo)
            .copy_(params_[i].tensor.reshape({-1}).narrow(0, o.lo, o.hi - o.lo));
    }
    Tensor all = Tensor::empty({b.slice * b.group->size()}, b.dtype, b.device);
    b.group->all_gather(mine, all);
    ++stats_.gathered_packed;
    for (std::size_t k = 0; k < b.params.size(); ++k) {
      const int i = b.params[k];
      if (had_[i] == 0) continue;
      Tensor t = params_[i].tensor;
      t.copy_(all.narrow(0, b.offsets[k], t.numel()).view(t.shape()));
    }
  }
  for (std::size_t i = 0; i < params_.size(); ++i)
    if (params_[i].sparse) share_rows(static_cast<int>(i));
  for (Communicator* g : groups_) g->synchronize();
  stats_.gather_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace hydra::parallel

namespace hydra::parallel {

// The rows of a row-sparse parameter touched this step (the merged gradient's rows: the same list,
// ascending, on every rank of the group) were updated by their owners; every rank gets them. Each
// touched row is non-zero in exactly one rank's contribution to a sum, and the other ranks first
// subtract their stale copy (x - x = 0 exactly), so the rows arrive bit for bit.
void GradientReducer::share_rows(int i) {
  const ReducedParam& p = params_[i];
  const auto& sg = p.tensor.sparse_grad();
  if (!sg || sg->rows.numel() == 0) return;  // untouched on every rank (the merge made them agree)
  const int64_t cols = p.tensor.size(1), k = sg->rows.numel(), a = runs_[i].first,
                b = runs_[i].last;
  Tensor current = gather_rows(p.tensor.detach(), sg->rows);  // [k, cols]
  Tensor mine = zeros({k, cols}, p.tensor.dtype(), p.tensor.device());
  if (b > a) mine.narrow(0, a, b - a).copy_(current.narrow(0, a, b - a));
  p.group->all_reduce(mine, ReduceOp::kSum);  // every touched row, from its owner
  Tensor stale = neg(current);
  if (b > a) stale.narrow(0, a, b - a).zero_();  // the owned rows stay
  if (a > 0 || b < k) {
    if (b > a) mine.narrow(0, a, b - a).zero_();   // added to the owned rows: + 0
    scatter_add_rows_(p.tensor, sg->rows, stale);  // the others' rows: exactly 0
    scatter_add_rows_(p.tensor, sg->rows, mine);   // ... plus their owners' values
  }
}

}  // namespace hydra::parallel
