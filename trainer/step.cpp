#include "trainer/step.h"

#include "autograd/ops.h"

namespace hydra::trainer {
namespace {

Tensor rows_of(const std::vector<int64_t>& v, int64_t cols, int64_t row0, int64_t nrows,
               Device dev) {
  std::vector<int64_t> part(v.begin() + row0 * cols, v.begin() + (row0 + nrows) * cols);
  return tensor(part, {nrows, cols}).to(dev);
}

}  // namespace

StepLosses forward_backward(model::LanguageModel& model, const parallel::ProcessGrid& grid,
                            parallel::GradientReducer* reducer, const data::Batch& local,
                            const StepSettings& s) {
  // The cross-entropy's normaliser: the step's targets over every rank and micro-batch, so each
  // micro-batch's loss is its share of the mean over the global batch.
  std::vector<double> count{0.0};
  for (int64_t t : local.targets) count[0] += t != model::LanguageModel::kIgnoreIndex;
  if (grid.distributed()) grid.world().all_reduce_host(count);
  const int64_t accum = s.grad_accum, micro = local.batch / accum;
  HYDRA_CHECK(accum >= 1 && micro * accum == local.batch)
      << "a batch of " << local.batch << " sequences does not split into " << accum
      << " micro-batches";
  std::vector<double> losses(5, 0.0);  // lm, total, balance, locality, sparsity: this rank's shares
  StepLosses out;
  for (int64_t m = 0; m < accum; ++m) {
    model::ForwardContext ctx;
    ctx.paths = s.paths;
    ctx.recompute = s.recompute;
    ctx.aux_scale = s.aux_scale / double(accum);  // the step's aux losses: the micro-batches' mean
    ctx.collect_stats = s.collect_stats && m + 1 == accum;
    ctx.grid = &grid;
    ctx.lm_tokens = std::max(count[0], 1.0);
    ctx.pos0 = grid.sp_rank() * local.len;
    const Tensor tokens = rows_of(local.tokens, local.len, m * micro, micro, s.device);
    const Tensor targets = rows_of(local.targets, local.len, m * micro, micro, s.device);
    const model::LmOutput o = model.forward(tokens, targets, ctx);
    const bool last = m + 1 == accum;
    if (reducer != nullptr && last)
      reducer->prepare();  // earlier micro-batches only accumulate locally
    o.loss.backward();
    // The loss values come back after the backward is queued: reading them first would leave the
    // GPU idle while the host queued the backward's first kernels.
    losses[0] += o.lm_loss.item<double>();
    losses[1] += o.loss.item<double>();
    const std::vector<double> a = o.aux.to_vector<double>();
    for (int k = 0; k < 3; ++k) losses[2 + k] += a[k];
    if (reducer != nullptr && last) reducer->finish();
    if (last) out.stats = std::move(ctx.stats);
  }
  // The losses of the global batch: the sum of the ranks' shares (the same value on every rank).
  if (grid.distributed()) grid.world().all_reduce_host(losses);
  out.lm = losses[0];
  out.total = losses[1];
  out.aux.assign(losses.begin() + 2, losses.end());
  return out;
}

}  // namespace hydra::trainer
