#include "trainer/curriculum.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>

#include "configs/config_io.h"
#include "data/synthetic.h"

namespace hydra::trainer {
namespace {

bool contains(const std::string& s, const char* part) { return s.find(part) != std::string::npos; }

}  // namespace

const std::vector<std::string>& freeze_groups() {
  static const std::vector<std::string> groups = {"embedding", "backbone",   "sga",
                                                  "moe",       "controller", "memory"};
  return groups;
}

bool in_freeze_group(const std::string& p, const std::string& group) {
  if (group == "embedding") return p == "embedding";
  if (group == "backbone")
    return p == "embedding" || p.rfind("final_norm", 0) == 0 || contains(p, ".ssm.") ||
           contains(p, ".norm_ssm.") || p.ends_with(".gate_ssm") || contains(p, ".attn.") ||
           contains(p, ".ffn.") || contains(p, ".norm_attn.") || contains(p, ".norm_ffn.");
  if (group == "sga")
    return contains(p, ".sga.") || contains(p, ".norm_sga.") || p.ends_with(".gate_sga");
  if (group == "moe")
    return contains(p, ".moe.") || contains(p, ".norm_moe.") || p.ends_with(".gate_moe");
  if (group == "controller") return contains(p, ".ctrl.") || contains(p, ".norm_ctrl.");
  if (group == "memory") return p.rfind("workspaces.", 0) == 0 || p.rfind("pkms.", 0) == 0;
  return false;
}

void resolve_run_config(config::RunConfig* cfg) {
  for (auto& st : *cfg->mutable_curriculum()->mutable_stage()) {
    if (!st.has_lr()) *st.mutable_lr() = cfg->train().lr();
    if (!st.has_data_mix()) *st.mutable_data_mix() = cfg->data().synthetic();
    if (st.seq_len() == 0)
      st.set_seq_len(cfg->train().seq_len());  // a negative one is refused later
    if (st.batch_size() == 0) st.set_batch_size(cfg->train().batch_size());
  }
  config::resolve_defaults(cfg);
}

namespace {

// The most batches one evaluation reads (a typo's extra zeros get a message, not a run that never
// ends its first evaluation).
constexpr int64_t kMaxEvalBatches = 1000000;

// "<source>: <field> = <value> <requirement>" as an invalid-argument status.
template <class V>
Status field_error(const std::string& source, const std::string& field, const V& value,
                   const std::string& requirement) {
  std::ostringstream os;
  os << source << ": " << field << " = " << value << " " << requirement;
  return invalid_argument(os.str());
}

// The train and data fields every stage depends on.
Status check_train_fields(const config::RunConfig& cfg, const std::string& source) {
  const auto& tr = cfg.train();
  auto fail = [&](const std::string& field, const auto& value, const std::string& requirement) {
    return field_error(source, field, value, requirement);
  };
  if (tr.steps() < 1) return fail("train.steps", tr.steps(), "must be >= 1");
  if (tr.batch_size() < 1) return fail("train.batch_size", tr.batch_size(), "must be >= 1");
  if (tr.grad_accum() < 1) return fail("train.grad_accum", tr.grad_accum(), "must be >= 1");
  if (tr.seq_len() < 1) return fail("train.seq_len", tr.seq_len(), "must be >= 1");
  if (tr.eval_every() < 0)
    return fail("train.eval_every", tr.eval_every(), "must be >= 0 (0: only at the end)");
  if (tr.save_every() < -1)
    return fail("train.save_every", tr.save_every(),
                "must be >= -1 (0: only at the end; -1: never, for benchmarks)");
  if (tr.keep_last() < 1) return fail("train.keep_last", tr.keep_last(), "must be >= 1");
  if (tr.log_every() < 1) return fail("train.log_every", tr.log_every(), "must be >= 1");
  if (tr.stats_every() < 1) return fail("train.stats_every", tr.stats_every(), "must be >= 1");
  if (tr.eval_batches() < 1 || tr.eval_batches() > kMaxEvalBatches)
    return fail("train.eval_batches", tr.eval_batches(),
                "must be in [1, " + std::to_string(kMaxEvalBatches) +
                    "]: each evaluation reads that many batches (a million is days of evaluation "
                    "at full size)");
  if (!(tr.peak_tflops() >= 0) || !std::isfinite(tr.peak_tflops()))
    return fail("train.peak_tflops", tr.peak_tflops(),
                "must be a finite number >= 0 (0: the device's default)");
  if (tr.device() != "cpu" && tr.device() != "cuda")
    return fail("train.device", tr.device(), "must be cpu or cuda");
  if (tr.lr().lr() <= 0) return fail("train.lr.lr", tr.lr().lr(), "must be > 0");
  if (tr.optimizer().grad_clip() < 0)
    return fail("train.optimizer.grad_clip", tr.optimizer().grad_clip(), "must be >= 0 (0: off)");
  if (!(tr.optimizer().pkm_value_lr() >= 0))
    return fail("train.optimizer.pkm_value_lr", tr.optimizer().pkm_value_lr(), "must be >= 0");
  if (!(tr.optimizer().router_lr() >= 0))
    return fail("train.optimizer.router_lr", tr.optimizer().router_lr(),
                "must be >= 0 (0: the model's learning rate)");
  if (tr.optimizer().beta1() < 0 || tr.optimizer().beta1() >= 1)
    return fail("train.optimizer.beta1", tr.optimizer().beta1(), "must be in [0, 1)");
  if (tr.optimizer().beta2() < 0 || tr.optimizer().beta2() >= 1)
    return fail("train.optimizer.beta2", tr.optimizer().beta2(), "must be in [0, 1)");
  if (cfg.data().eval_fraction() < 0 || cfg.data().eval_fraction() >= 1)
    return fail("data.eval_fraction", cfg.data().eval_fraction(), "must be in [0, 1)");
  // Every run evaluates (at its end, and every train.eval_every steps): with shards, refuse at
  // start-up what would otherwise fail at the first evaluation, after the training it would lose.
  if (cfg.data().shards_size() > 0 && cfg.data().eval_fraction() <= 0)
    return fail(
        "data.eval_fraction", cfg.data().eval_fraction(),
        "leaves no held-out tokens for the evaluation every run makes (at its end, and every "
        "train.eval_every steps); set it > 0, e.g. 0.01");
  if (cfg.data().prefetch() < 0)
    return fail("data.prefetch", cfg.data().prefetch(), "must be >= 0");
  if (Status st = data::validate_synthetic(cfg.data().synthetic(), "data.synthetic."); !st.ok())
    return invalid_argument(source + ": " + st.message());

  return ok_status();
}

// Stage i of the curriculum starting at step `start` (or, without a curriculum, the whole run as
// one stage named "train"), its fields resolved against train.* and checked.
Expected<Stage> stage_from(const config::RunConfig& cfg, const model::ModelSpec& spec, int64_t i,
                           int64_t start, const std::string& source) {
  const auto& tr = cfg.train();
  const bool staged = cfg.curriculum().stage_size() > 0;
  auto fail = [&](const std::string& field, const auto& value, const std::string& requirement) {
    return Expected<Stage>(field_error(source, field, value, requirement));
  };
  Stage s;
  s.index = i;
  s.start = start;
  const std::string f = "curriculum.stage[" + std::to_string(i) + "].";
  if (staged) {
    const auto& c = cfg.curriculum().stage(i);
    s.name = c.has_name() && !c.name().empty() ? c.name() : "stage" + std::to_string(i + 1);
    if (c.steps() < 1) return fail(f + "steps", c.steps(), "must be >= 1");
    if (c.steps() > std::numeric_limits<int64_t>::max() - start)
      return fail(f + "steps", c.steps(),
                  "with the stages before it must add up to at most 2^63 - 1 steps");
    if (c.seq_len() < 0) return fail(f + "seq_len", c.seq_len(), "must be >= 0 (0: train.seq_len)");
    if (c.batch_size() < 0)
      return fail(f + "batch_size", c.batch_size(), "must be >= 0 (0: train.batch_size)");
    s.steps = c.steps();
    s.seq_len = c.seq_len() > 0 ? c.seq_len() : tr.seq_len();
    s.batch = c.batch_size() > 0 ? c.batch_size() : tr.batch_size();
    s.lr = c.has_lr() ? c.lr() : tr.lr();
    s.paths = {c.ssm(), c.sga(), c.moe_routing(), c.workspace(), c.pkm()};
    s.freeze.assign(c.freeze().begin(), c.freeze().end());
    s.aux_scale = c.aux_loss_scale();
    s.aux_warmup = c.aux_warmup_steps();
    s.data_mix = c.has_data_mix() ? c.data_mix() : cfg.data().synthetic();
    if (Status st = data::validate_synthetic(s.data_mix, f + "data_mix."); !st.ok())
      return invalid_argument(source + ": " + st.message());
    if (!s.paths.ssm)
      return fail(f + "ssm", "false", "is not supported: the SSM backbone is on in every stage");
    if (s.aux_scale < 0) return fail(f + "aux_loss_scale", s.aux_scale, "must be >= 0");
    if (s.aux_warmup < 0) return fail(f + "aux_warmup_steps", s.aux_warmup, "must be >= 0");
    if (s.lr.lr() <= 0) return fail(f + "lr.lr", s.lr.lr(), "must be > 0");
    for (const std::string& g : s.freeze)
      if (std::find(freeze_groups().begin(), freeze_groups().end(), g) == freeze_groups().end())
        return fail(f + "freeze", g,
                    "is not a parameter group (one of: embedding, backbone, sga, moe, "
                    "controller, memory)");
  } else {
    s.name = "train";
    s.steps = tr.steps();
    s.seq_len = tr.seq_len();
    s.batch = tr.batch_size();
    s.lr = tr.lr();
    s.data_mix = cfg.data().synthetic();
  }
  const std::string where = staged ? f : "train.";
  if (s.seq_len > spec.max_seq_len)
    return fail(where + "seq_len", s.seq_len,
                "exceeds model.max_seq_len (" + std::to_string(spec.max_seq_len) + ")");
  if (!spec.transformer && s.seq_len % spec.moe_chunk != 0)
    return fail(where + "seq_len", s.seq_len,
                "must be a multiple of model.moe.chunk (" + std::to_string(spec.moe_chunk) + ")");
  if (!spec.transformer && !spec.ws_after.empty() && s.seq_len % spec.ws_chunk != 0)
    return fail(
        where + "seq_len", s.seq_len,
        "must be a multiple of model.workspace.chunk (" + std::to_string(spec.ws_chunk) + ")");
  if (s.batch % tr.grad_accum() != 0)
    return fail(where + "batch_size", s.batch,
                "must be a multiple of train.grad_accum (" + std::to_string(tr.grad_accum()) + ")");
  return s;
}

}  // namespace

Expected<std::vector<Stage>> resolve_stages(const config::RunConfig& cfg,
                                            const model::ModelSpec& spec,
                                            const std::string& source) {
  HYDRA_RETURN_IF_ERROR(check_train_fields(cfg, source));
  std::vector<Stage> stages;
  const bool staged = cfg.curriculum().stage_size() > 0;
  const int64_t count = staged ? cfg.curriculum().stage_size() : 1;
  int64_t start = 0;
  for (int64_t i = 0; i < count; ++i) {
    HYDRA_ASSIGN_OR_RETURN(Stage s, stage_from(cfg, spec, i, start, source));
    start += s.steps;
    stages.push_back(s);
  }
  if (staged && start != cfg.train().steps()) {
    std::ostringstream os;
    os << source << ": the curriculum stages add up to " << start
       << " steps but train.steps = " << cfg.train().steps() << "; make them equal";
    return Expected<std::vector<Stage>>(invalid_argument(os.str()));
  }
  return stages;
}

const Stage& stage_at(const std::vector<Stage>& stages, int64_t step) {
  for (const Stage& s : stages)
    if (step < s.start + s.steps) return s;
  return stages.back();
}

}  // namespace hydra::trainer
