// What the trainer does differently on a process grid: the grid's checks against the config, each
// rank's part of a batch, the gradient reducer's parameter groups, statistics averaged over the
// ranks, and agreeing on errors so that no rank waits for one that gave up.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "data/loader.h"
#include "model/lm.h"
#include "parallel/reducer.h"
#include "trainer/curriculum.h"
#include "trainer/optimizer.h"

namespace hydra::trainer {

// parallel { dp ep sp } against the model and every stage: ep divides the experts, each data rank
// gets whole sequences (and whole micro-batches), each sequence shard whole MoE / workspace chunks.
Status validate_parallel(const config::RunConfig& cfg, const model::ModelSpec& spec,
                         const std::vector<Stage>& stages, const std::string& source);

// The columns [sp_rank * L / sp, (sp_rank + 1) * L / sp) of every sequence of `b`.
data::Batch sequence_shard(data::Batch b, int64_t sp_rank, int64_t sp);

// Expert parameters (sharded over the ep group) are reduced over their replicas; the rest over the
// world. Row-sparse parameters (ParamOptions::sparse_grad) are merged, not bucketed. zero1: the
// buckets are reduce-scattered and the optimizer state is sharded over each parameter's group.
std::unique_ptr<parallel::GradientReducer> make_reducer(model::LanguageModel& model,
                                                        const parallel::ProcessGrid& grid,
                                                        double bucket_mb, bool zero1 = false);
bool is_expert_parameter(const std::string& name);

// The norm of the whole model's gradient: the replicated parameters' part (the same on every rank
// after the reduction) plus the expert shards' parts summed over the ep group. Under ZeRO-1 the
// ranges of every rank partition the model, so their parts are summed over the world.
double global_grad_norm(const AdamW& optimizer, const parallel::ProcessGrid& grid);
// Its square as an f64 [1] tensor on the parameters' device, for clipping on the device. With one
// rank or data parallelism alone (each rank holds the whole reduced gradient) the host does not
// wait for the device; expert parallelism and ZeRO-1 sum over the ranks on the host.
Tensor global_grad_sum_squares(const AdamW& optimizer, const parallel::ProcessGrid& grid);

// Statistics over the ranks (every rank holds the same keys): keys ending in "_loss" are a rank's
// share of a global loss and are summed; the rest are averaged.
void average_over_ranks(std::map<std::string, double>& stats, const parallel::ProcessGrid& grid);

// Every rank learns whether any rank failed, and the first failure's message ("rank k: ..." when k
// is not rank 0), so that rank 0 can print it and every rank stops.
Status agree(const Status& mine, const parallel::ProcessGrid& grid);

}  // namespace hydra::trainer
