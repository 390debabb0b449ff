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
  double targets = 0;
  for (int64_t t : local.targets) targets += t != model::LanguageModel::kIgnoreIndex;
  parallel::Communicator* world = grid.distributed() ? &grid.world() : nullptr;
  parallel::HostSum().add(targets).sum(world);
  const int64_t accum = s.grad_accum, micro = local.batch / accum;
  HYDRA_CHECK(accum >= 1 && micro * accum == local.batch)
      << "a batch of " << local.batch << " sequences does not split into " << accum
      << " micro-batches";
  StepLosses out;  // this rank's shares, then (below) the global batch's
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
    // The loss values come back after the backward is queued: reading them first would leave the
    // GPU idle while the host queued the backward's first kernels.
    out.lm += o.lm_loss.item<double>();
    out.total += o.loss.item<double>();
    out.aux += model::AuxLosses::read(o.aux);
    if (reducer != nullptr && last) reducer->finish();
    if (last) out.stats = std::move(ctx.stats);
  }
  // The losses of the global batch: the sum of the ranks' shares (the same value on every rank).
  parallel::HostSum()
      .add(out.lm)
      .add(out.total)
      .add(out.aux.balance)
      .add(out.aux.locality)
      .add(out.aux.sparsity)
      .sum(world);
  return out;
}

}  // namespace hydra::trainer
