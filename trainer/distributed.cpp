#include "trainer/distributed.h"

#include <cmath>
#include <sstream>

namespace hydra::trainer {

Status validate_parallel(const config::RunConfig& cfg, const model::ModelSpec& spec,
                         const std::vector<Stage>& stages, const std::string& source) {
  const auto& p = cfg.parallel();
  auto fail = [&](const std::string& what) { return invalid_argument(source + ": " + what); };
  const std::string grid = "parallel { dp: " + std::to_string(p.dp()) +
                           " ep: " + std::to_string(p.ep()) + " sp: " + std::to_string(p.sp()) +
                           " }";
  if (p.dp() < 1 || p.ep() < 1 || p.sp() < 1) return fail(grid + ": every size must be >= 1");
  if (p.bucket_mb() <= 0)
    return fail("parallel.bucket_mb = " + std::to_string(p.bucket_mb()) + " must be > 0");
  if (p.timeout_s() <= 0)
    return fail("parallel.timeout_s = " + std::to_string(p.timeout_s()) + " must be > 0");
  if (spec.transformer && (p.ep() > 1 || p.sp() > 1))
    return fail(grid +
                ": the dense Transformer baseline supports data parallelism only (ep = sp = 1)");
  if (!spec.transformer && spec.num_experts % p.ep() != 0)
    return fail("parallel.ep = " + std::to_string(p.ep()) +
                " does not divide model.moe.num_experts = " + std::to_string(spec.num_experts) +
                " (each ep rank holds num_experts / ep experts)");
  const int64_t data_ranks = p.dp() * p.ep(), accum = cfg.train().grad_accum();
  for (const Stage& s : stages) {
    const std::string where = "stage '" + s.name + "' (" + grid + "): ";
    if (s.batch % data_ranks != 0)
      return fail(where + "batch size " + std::to_string(s.batch) +
                  " is not a multiple of dp * ep = " + std::to_string(data_ranks) +
                  " (each data rank takes whole sequences)");
    if ((s.batch / data_ranks) % accum != 0)
      return fail(where + "each data rank's " + std::to_string(s.batch / data_ranks) +
                  " sequences do not split into train.grad_accum = " + std::to_string(accum) +
                  " micro-batches");
    if (p.sp() == 1) continue;
    if (s.seq_len % p.sp() != 0)
      return fail(where + "seq_len " + std::to_string(s.seq_len) +
                  " is not a multiple of sp = " + std::to_string(p.sp()));
    const int64_t shard = s.seq_len / p.sp();
    if (!spec.transformer && shard < spec.conv_width - 1)
      return fail(where + "each sequence shard of " + std::to_string(shard) +
                  " tokens is shorter than the " + std::to_string(spec.conv_width - 1) +
                  "-token halo of the SSM's convolution (model.ssm.conv_width = " +
                  std::to_string(spec.conv_width) + "); use a smaller sp or a longer seq_len");
    if (!spec.transformer && shard % spec.moe_chunk != 0)
      return fail(where + "each sequence shard of " + std::to_string(shard) +
                  " tokens must hold whole MoE chunks (" +
                  "model.moe.chunk = " + std::to_string(spec.moe_chunk) + ")");
    const int64_t group = cfg.model().moe().sparsity_group();
    if (!spec.transformer && (shard / spec.moe_chunk) % group != 0)
      return fail(where + "each sequence shard's " + std::to_string(shard / spec.moe_chunk) +
                  " MoE chunks must hold whole sparsification groups (model.moe.sparsity_group = " +
                  std::to_string(group) + ")");
    if (!spec.transformer && !spec.ws_after.empty() && shard % spec.ws_chunk != 0)
      return fail(where + "each sequence shard of " + std::to_string(shard) +
                  " tokens must hold whole workspace chunks (model.workspace.chunk = " +
                  std::to_string(spec.ws_chunk) + ")");
  }
  return ok_status();
}

data::Batch sequence_shard(data::Batch b, int64_t sp_rank, int64_t sp) {
  if (sp == 1) return b;  // the whole sequences (moved, not copied, from a caller's temporary)
  const int64_t n = b.len / sp, c0 = sp_rank * n;
  data::Batch out;
  out.step = b.step;
  out.batch = b.batch;
  out.len = n;
  for (int64_t s = 0; s < b.batch; ++s) {
    const int64_t row = s * b.len + c0;
    out.tokens.insert(out.tokens.end(), b.tokens.begin() + row, b.tokens.begin() + row + n);
    out.targets.insert(out.targets.end(), b.targets.begin() + row, b.targets.begin() + row + n);
    out.answer.insert(out.answer.end(), b.answer.begin() + row, b.answer.begin() + row + n);
    out.level.insert(out.level.end(), b.level.begin() + row, b.level.begin() + row + n);
    out.domain.insert(out.domain.end(), b.domain.begin() + row, b.domain.begin() + row + n);
  }
  return out;
}

bool is_expert_parameter(const std::string& name) {
  const auto ends = [&](const char* s) {
    const std::string suffix = s;
    return name.size() >= suffix.size() &&
           name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  return name.find(".moe.") != std::string::npos &&
         (ends(".moe.w1") || ends(".moe.w2") || ends(".moe.w3"));
}

std::unique_ptr<parallel::GradientReducer> make_reducer(model::LanguageModel& model,
                                                        const parallel::ProcessGrid& grid,
                                                        double bucket_mb, bool zero1) {
  std::vector<parallel::ReducedParam> params;
  for (const auto& p : model.named_parameters()) {
    parallel::ReducedParam r;
    r.name = p.name;
    r.tensor = p.tensor;
    r.sparse = p.options.sparse_grad;
    r.group = grid.shape().ep > 1 && is_expert_parameter(p.name) ? &grid.expert_replicas()
                                                                 : &grid.world();
    params.push_back(std::move(r));
  }
  return std::make_unique<parallel::GradientReducer>(std::move(params), bucket_mb, zero1);
}

namespace {

// The square of global_grad_norm, on the host.
double global_sum_squares_host(const AdamW& optimizer, const parallel::ProcessGrid& grid) {
  const auto all = [](const std::string&) { return true; };
  if (optimizer.sharded()) {
    // The ranges partition every parameter over the world (an expert's over its replicas, the
    // experts over ep; the row-sparse ones by rows). Any parameter left unsharded would be the same
    // on every rank: counted on rank 0 only (none is, today).
    const double ranges = optimizer.grad_sum_squares(all, GradPart::kSharded);
    const double replicated =
        grid.world().rank() == 0 ? optimizer.grad_sum_squares(all, GradPart::kReplicated) : 0.0;
    return grid.world().all_reduce_host(ranges + replicated);
  }
  if (grid.shape().ep == 1) return optimizer.grad_sum_squares(all);
  const double dense =
      optimizer.grad_sum_squares([](const std::string& n) { return !is_expert_parameter(n); });
  const double experts = grid.ep().all_reduce_host(
      optimizer.grad_sum_squares([](const std::string& n) { return is_expert_parameter(n); }));
  return dense + experts;
}

}  // namespace

double global_grad_norm(const AdamW& optimizer, const parallel::ProcessGrid& grid) {
  return std::sqrt(global_sum_squares_host(optimizer, grid));
}

Tensor global_grad_sum_squares(const AdamW& optimizer, const parallel::ProcessGrid& grid) {
  if (!optimizer.sharded() && grid.shape().ep == 1)
    return optimizer.grad_sum_squares_on_device([](const std::string&) { return true; });
  return tensor(std::vector<double>{global_sum_squares_host(optimizer, grid)}, {1})
      .to(optimizer.device());
}

void average_over_ranks(std::map<std::string, double>& stats, const parallel::ProcessGrid& grid) {
  if (!grid.distributed() || stats.empty()) return;
  std::vector<double> v;
  v.reserve(stats.size());
  for (const auto& kv : stats) v.push_back(kv.second);
  grid.world().all_reduce_host(v);
  std::size_t i = 0;
  const auto is_share =
      [](const std::string& k) {  // a rank's share of a global loss: shares add up
        return k.size() > 5 && k.compare(k.size() - 5, 5, "_loss") == 0;
      };
  for (auto& kv : stats) {
    kv.second = is_share(kv.first) ? v[i] : v[i] / double(grid.world().size());
    ++i;
  }
}

Status agree(const Status& mine, const parallel::ProcessGrid& grid) {
  if (!grid.distributed()) return mine;
  const int size = grid.world().size();
  // The lowest failed rank (size when none) tells everyone its message.
  const int first = static_cast<int>(grid.world().all_reduce_host(
      mine.ok() ? double(size) : double(grid.world().rank()), parallel::ReduceOp::kMin));
  if (first >= size) return mine;
  constexpr int64_t kMax = 4096;
  std::vector<int32_t> text(kMax, 0);
  if (grid.world().rank() == first) {
    const std::string& m = mine.message();
    for (std::size_t i = 0; i < m.size() && i + 2 < std::size_t(kMax); ++i)
      text[i] = static_cast<unsigned char>(m[i]);
    text[kMax - 1] = static_cast<int32_t>(mine.code());
  }
  Tensor t = tensor(text, {kMax}).to(grid.world().device());
  grid.world().broadcast(t, first);
  const std::vector<int32_t> got = t.cpu().to_vector<int32_t>();
  std::string message;
  for (int64_t i = 0; i + 1 < kMax && got[i] != 0; ++i)
    message.push_back(static_cast<char>(got[i]));
  if (!mine.ok() && grid.world().rank() == first) return mine;
  return Status(static_cast<StatusCode>(got[kMax - 1]),
                first == 0 ? message : "rank " + std::to_string(first) + ": " + message);
}

}  // namespace hydra::trainer
