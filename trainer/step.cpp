#include "trainer/step.h"

#include <algorithm>
#include <cmath>

#include "autograd/grad_mode.h"
#include "autograd/ops.h"

namespace hydra::trainer {
namespace {

// Rows [row0, row0 + nrows) of a batch's [*, cols] token array, on `dev`. A GPU's copy comes from
// page-locked memory: it is queued without waiting (from pageable memory the driver may wait for
// the stream, the update of the step before still in it).
Tensor rows_of(const std::vector<int64_t>& v, int64_t cols, int64_t row0, int64_t nrows,
               Device dev) {
  Tensor host = dev.is_cuda() ? Tensor::empty_pinned({nrows, cols}, DType::kI64)
                              : Tensor::empty({nrows, cols}, DType::kI64);
  std::copy(v.begin() + row0 * cols, v.begin() + (row0 + nrows) * cols, host.data<int64_t>());
  return host.to(dev);
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
    const Tensor tokens = rows_of(local.tokens, local.len, m * micro, micro, s.device);
    const Tensor targets = rows_of(local.targets, local.len, m * micro, micro, s.device);
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

StepLosses QueuedLosses::read(const parallel::ProcessGrid& grid) const {
  NoGradGuard ng;
  std::vector<Tensor> all = parts;
  if (grad_sum_squares.defined()) all.push_back(grad_sum_squares.to(parts.front().device()));
  const std::vector<double> v =
      (all.size() == 1 ? all.front() : concat(all, 0)).to_vector<double>();
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
