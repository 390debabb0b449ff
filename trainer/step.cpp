#include "trainer/step.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "autograd/grad_mode.h"
#include "autograd/ops.h"

namespace hydra::trainer {
namespace {

// Rows [row0, row0 + nrows) of the batch's tokens and targets, on `dev`, in one copy. A GPU's copy
// comes from page-locked memory: it is queued without waiting (from pageable memory the driver may
// wait for the stream, the update of the step before still in it).
std::pair<Tensor, Tensor> batch_rows(const data::Batch& b, int64_t row0, int64_t nrows,
                                     Device dev) {
  const int64_t n = nrows * b.len, from = row0 * b.len;
  Tensor host = dev.is_cuda() ? Tensor::empty_pinned({2, nrows, b.len}, DType::kI64)
                              : Tensor::empty({2, nrows, b.len}, DType::kI64);
  int64_t* h = host.data<int64_t>();
  std::copy(b.tokens.begin() + from, b.tokens.begin() + from + n, h);
  std::copy(b.targets.begin() + from, b.targets.begin() + from + n, h + n);
  const Tensor both = host.to(dev);
  return {both.select(0, 0), both.select(0, 1)};
}

}  // namespace

StepLosses forward_backward(model::LanguageModel& model, const parallel::ProcessGrid& grid,
                            parallel::GradientReducer* reducer, const data::Batch& local,
                            const StepSettings& s) {
  return forward_backward_queued(model, grid, reducer, local, s).read(grid);
}

QueuedLosses forward_backward_queued(model::LanguageModel& model, const parallel::ProcessGrid& grid,
                                     parallel::GradientReducer* reducer, const data::Batch& local,
                                     const StepSettings& s) {
  // The cross-entropy's normaliser: the step's targets over every rank and micro-batch, so each
  // micro-batch's loss is its share of the mean over the global batch.
  double targets = 0;
  for (int64_t t : local.targets) targets += t != model::LanguageModel::kIgnoreIndex;
  parallel::Communicator* world = grid.distributed() ? &grid.world() : nullptr;
  parallel::HostSum().add(targets).sum(world);
  const int64_t accum = s.grad_accum, micro = local.batch / accum;
  HYDRA_CHECK(accum >= 1 && micro * accum == local.batch)
      << "a batch of " << local.batch << " sequences does not split into " << accum
      << " micro-batches";
  QueuedLosses out;  // this rank's shares
  for (int64_t m = 0; m < accum; ++m) {
    model::ForwardContext ctx;
    ctx.paths = s.paths;
    ctx.recompute = s.recompute;
    ctx.aux_scale = s.aux_scale / double(accum);  // the step's aux losses: the micro-batches' mean
    ctx.collect_stats = s.collect_stats && m + 1 == accum;
    ctx.grid = &grid;
    ctx.lm_tokens = std::max(targets, 1.0);
    ctx.pos0 = grid.sp_rank() * local.len;
    const auto [tokens, targets] = batch_rows(local, m * micro, micro, s.device);
    const model::LmOutput o = model.forward(tokens, targets, ctx);
    const bool last = m + 1 == accum;
    if (reducer != nullptr && last)
      reducer->prepare();  // earlier micro-batches only accumulate locally
    o.loss.backward();
    {
      NoGradGuard ng;
      out.parts.push_back(concat({o.lm_loss.detach().reshape({1}).to(DType::kF64),
                                  o.loss.detach().reshape({1}).to(DType::kF64),
                                  o.aux.detach().reshape({-1}).to(DType::kF64)},
                                 0));
    }
    if (reducer != nullptr && last) reducer->finish();
    if (last) out.stats = std::move(ctx.stats);
  }
  return out;
}

Tensor QueuedLosses::values() const {
  NoGradGuard ng;
  std::vector<Tensor> all = parts;
  if (grad_sum_squares.defined()) all.push_back(grad_sum_squares.to(parts.front().device()));
  return all.size() == 1 ? all.front() : concat(all, 0);
}

void QueuedLosses::start_read() { copy_ = std::make_shared<PendingHostCopy>(values()); }

StepLosses QueuedLosses::read(const parallel::ProcessGrid& grid) const {
  const std::vector<double> v =
      copy_ ? copy_->host().to_vector<double>() : values().to_vector<double>();
  constexpr std::size_t kPart = 2 + model::kNumAuxLosses;
  const std::size_t n = kPart * parts.size();
  HYDRA_CHECK(v.size() == n + (grad_sum_squares.defined() ? 1 : 0))
      << "QueuedLosses: " << v.size() << " values";
  StepLosses out;
  if (grad_sum_squares.defined()) out.grad_norm = std::sqrt(v[n]);
  for (std::size_t i = 0; i < n; i += kPart) {
    out.lm += v[i];
    out.total += v[i + 1];
    out.aux += model::AuxLosses{v[i + 2 + model::kAuxBalance], v[i + 2 + model::kAuxLocality],
                                v[i + 2 + model::kAuxSparsity]};
  }
  out.stats = stats;
  // The losses of the global batch: the sum of the ranks' shares (the same value on every rank).
  parallel::HostSum()
      .add(out.lm)
      .add(out.total)
      .add(out.aux.balance)
      .add(out.aux.locality)
      .add(out.aux.sparsity)
      .sum(grid.distributed() ? &grid.world() : nullptr);
  return out;
}

}  // namespace hydra::trainer
