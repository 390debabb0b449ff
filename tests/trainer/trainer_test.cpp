#include "trainer/trainer.h"

#include <gtest/gtest.h>

#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <random>
#include <sstream>

#include "autograd/cuda_context.h"
#include "configs/config_io.h"
#include "data/hdf5_file.h"
#include "data/shards.h"
#include "model/block.h"
#include "model/moe.h"
#include "model/spec.h"
#include "tests/fuzz_util.h"
#include "trainer/checkpoint.h"
#include "trainer/crc32c.h"

namespace hydra::trainer {
namespace {

namespace fs = std::filesystem;

// A small model on the synthetic data: two stages, the second with routing and memories.
const char* kSmallRun = R"(
model {
  vocab_size: 128 d_model: 16 num_blocks: 2 max_seq_len: 32
  ssm { d_state: 4 }
  sga { every: 2 num_heads: 2 window: 8 global_stride: 8 }
  moe { num_experts: 3 d_expert: 8 max_active: 2 chunk: 4 }
  workspace { slots: 2 chunk: 8 num_heads: 1 attn_dim: 8 }
  pkm { num_heads: 1 k_dim: 4 n_keys: 4 topk: 2 }
}
train {
  steps: 8 batch_size: 4 seq_len: 32 grad_accum: 2 eval_every: 4 eval_batches: 1 save_every: 4 keep_last: 5
  lr { lr: 0.01 warmup_steps: 2 }
}
data { prefetch: 2 }
curriculum {
  stage { name: "one" steps: 4 seq_len: 16 sga: false moe_routing: false workspace: false pkm: false }
  stage { name: "two" steps: 4 aux_warmup_steps: 2 }
}
)";

std::string temp_dir(const std::string& name) {
  const fs::path p =
      fs::temp_directory_path() / ("hydra_trainer_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  return p.string();
}

// The small run with `--set`-style overrides applied.
config::RunConfig small_config(const std::vector<std::string>& sets = {}) {
  config::RunConfig cfg;
  const Status st = config::parse_text(kSmallRun, "small.pbtxt", &cfg);
  EXPECT_TRUE(st.ok()) << st.message();
  for (const std::string& set : sets) {
    const Status o = config::apply_override(&cfg, set);
    EXPECT_TRUE(o.ok()) << o.message();
  }
  return cfg;
}

Expected<TrainSummary> train(const config::RunConfig& cfg, const std::string& out,
                             const std::string& resume = "", int64_t stop = -1,
                             std::unique_ptr<Trainer>* keep = nullptr, bool force = false) {
  TrainOptions o;
  o.out_dir = out;
  o.resume = resume;
  o.stop_step = stop;
  o.quiet = true;
  o.force = force;
  auto t = Trainer::create(cfg, "small.pbtxt", o);
  if (!t.ok()) return t.status();
  auto s = (*t)->run();
  if (keep) *keep = std::move(*t);
  return s;
}

std::vector<std::string> metric_lines(const std::string& run) {
  std::ifstream in(run + "/metrics.jsonl");
  std::vector<std::string> lines;
  std::string line;
  while (std::getline(in, line)) {
    // Drop the fields that measure time, not training.
    std::string kept;
    std::stringstream ss(line);
    std::string field;
    while (std::getline(ss, field, ',')) {
      if (field.find("tokens_per_s") != std::string::npos ||
          field.find("elapsed_s") != std::string::npos ||
          field.find("step_ms") != std::string::npos ||
          field.find("host_queue_ms") != std::string::npos ||
          field.find("host_wait_ms") != std::string::npos ||
          field.find("model_tflops") != std::string::npos ||
          field.find("\"mfu\"") != std::string::npos || field.find("memory.") != std::string::npos)
        continue;
      kept += field + ",";
    }
    lines.push_back(kept);
  }
  return lines;
}

// Two trainers' models hold the same parameters, bit for bit.
void expect_same_parameters(Trainer& a, Trainer& b) {
  const auto pa = a.model().named_parameters(), pb = b.model().named_parameters();
  ASSERT_EQ(pa.size(), pb.size());
  for (std::size_t i = 0; i < pa.size(); ++i)
    EXPECT_EQ(pa[i].tensor.to_vector<float>(), pb[i].tensor.to_vector<float>()) << pa[i].name;
}

TEST(Curriculum, StagesAreLaidOutAndValidated) {
  config::RunConfig cfg = small_config();
  resolve_run_config(&cfg);
  auto spec = model::make_spec(cfg.model(), "small.pbtxt");
  auto stages = resolve_stages(cfg, *spec, "small.pbtxt");
  ASSERT_TRUE(stages.ok()) << stages.status().message();
  ASSERT_EQ(stages->size(), 2u);
  EXPECT_EQ((*stages)[1].start, 4);
  EXPECT_EQ((*stages)[0].seq_len, 16);
  EXPECT_EQ((*stages)[1].seq_len, 32);           // inherited from train
  EXPECT_DOUBLE_EQ((*stages)[1].lr.lr(), 0.01);  // inherited from train.lr, not the proto default
  EXPECT_FALSE((*stages)[0].paths.sga);
  EXPECT_EQ(stage_at(*stages, 5).name, "two");

  auto error = [&](const std::string& extra_set) {
    config::RunConfig c = small_config();
    EXPECT_TRUE(config::apply_override(&c, extra_set).ok());
    resolve_run_config(&c);
    return resolve_stages(c, *spec, "small.pbtxt").status().message();
  };
  EXPECT_EQ(
      error("train.steps=9"),
      "small.pbtxt: the curriculum stages add up to 8 steps but train.steps = 9; make them equal");
  EXPECT_EQ(
      error("curriculum.stage={ name: \"x\" steps: 8 seq_len: 18 }"),
      "small.pbtxt: curriculum.stage[0].seq_len = 18 must be a multiple of model.moe.chunk (4)");
  EXPECT_EQ(error("curriculum.stage={ name: \"x\" steps: 8 seq_len: 20 }"),
            "small.pbtxt: curriculum.stage[0].seq_len = 20 must be a multiple of "
            "model.workspace.chunk (8)");
  EXPECT_EQ(error("curriculum.stage={ steps: 8 freeze: \"brain\" }"),
            "small.pbtxt: curriculum.stage[0].freeze = brain is not a parameter group (one of: "
            "embedding, backbone, "
            "sga, moe, controller, memory)");
  EXPECT_EQ(
      error("train.grad_accum=3"),
      "small.pbtxt: curriculum.stage[0].batch_size = 4 must be a multiple of train.grad_accum (3)");
  EXPECT_EQ(error("curriculum.stage={ steps: 8 seq_len: 64 }"),
            "small.pbtxt: curriculum.stage[0].seq_len = 64 exceeds model.max_seq_len (32)");
  // Steps that overflow when the stages are added up are refused, not summed past 2^63 - 1.
  EXPECT_EQ(error("curriculum={ stage { steps: 9223372036854775807 } stage { steps: 1 } }"),
            "small.pbtxt: curriculum.stage[1].steps = 1 with the stages before it must add up to "
            "at most 2^63 - 1 steps");
  EXPECT_NE(error("train.stats_every=0").find("train.stats_every = 0 must be >= 1"),
            std::string::npos)
      << error("train.stats_every=0");
}

TEST(Curriculum, FreezeGroupsSelectTheirParameters) {
  EXPECT_TRUE(in_freeze_group("blocks.3.ssm.in_proj.weight", "backbone"));
  EXPECT_TRUE(in_freeze_group("embedding", "backbone"));
  EXPECT_FALSE(in_freeze_group("blocks.3.moe.w1", "backbone"));
  EXPECT_TRUE(in_freeze_group("blocks.3.gate_moe", "moe"));
  EXPECT_TRUE(in_freeze_group("pkms.0.memory.values", "memory"));
  EXPECT_TRUE(in_freeze_group("blocks.1.sga.qkv.weight", "sga"));
  EXPECT_FALSE(in_freeze_group("blocks.1.sga.qkv.weight", "memory"));
}

TEST(Training, ResumeIsBitExact) {
  const std::string straight = temp_dir("straight"), split = temp_dir("split");
  std::unique_ptr<Trainer> a, b;
  auto sa = train(small_config(), straight, "", -1, &a);
  ASSERT_TRUE(sa.ok()) << sa.status().message();
  auto first = train(small_config(), split, "", 4);
  ASSERT_TRUE(first.ok()) << first.status().message();
  EXPECT_EQ(first->last_step, 4);
  auto second = train(small_config(), split, "auto", 8, &b);
  ASSERT_TRUE(second.ok()) << second.status().message();
  EXPECT_EQ(second->first_step, 4);
  EXPECT_EQ(second->last_step, 8);
  // Same losses, statistics and evaluations step by step, and the same final parameters, bit for
  // bit.
  EXPECT_EQ(metric_lines(straight), metric_lines(split));
  EXPECT_EQ(metric_lines(split).size(), 8u);
  expect_same_parameters(*a, *b);
  // The stage switch happened, and checkpoints are kept.
  EXPECT_TRUE(fs::exists(split + "/checkpoints/step-00000008/manifest.pb"));
  EXPECT_TRUE(fs::exists(split + "/checkpoints/step-00000004/rank-00000.h5"));
}

// Resumes inside a stage, not at its boundary: mid learning-rate warm-up in stage one (step 2) and
// mid aux-loss warm-up in stage two (step 5), with BlockFFN's adaptive coefficient changing every 2
// steps (odd step: inside its period). Losses, statistics, evaluations and final parameters match
// the straight run bit for bit (the first leg's own evaluation at its last step aside).
TEST(Training, ResumeMidStageIsBitExact) {
  const std::vector<std::string> sets = {"model.moe.objective=BLOCKFFN",
                                         "model.moe.blockffn_hold_steps=1",
                                         "model.moe.blockffn_period=2", "train.save_every=3"};
  const std::string straight = temp_dir("mid_straight");
  std::unique_ptr<Trainer> a;
  ASSERT_TRUE(train(small_config(sets), straight, "", -1, &a).ok());
  for (int64_t stop : {2, 5}) {
    const std::string split = temp_dir("mid_split" + std::to_string(stop));
    std::unique_ptr<Trainer> b;
    auto first = train(small_config(sets), split, "", stop);
    ASSERT_TRUE(first.ok()) << first.status().message();
    auto second = train(small_config(sets), split, "auto", 8, &b);
    ASSERT_TRUE(second.ok()) << second.status().message();
    EXPECT_EQ(second->first_step, stop);
    // The first leg evaluated at its last step, where the straight run did not: drop that line's
    // evaluation, the rest matches.
    std::vector<std::string> lines = metric_lines(split);
    ASSERT_EQ(lines.size(), 8u);
    std::string kept;
    std::stringstream fields(lines[stop - 1]);
    for (std::string field; std::getline(fields, field, ',');)
      if (field.find("\"eval.") == std::string::npos) kept += field + ",";
    lines[stop - 1] = kept;
    EXPECT_EQ(metric_lines(straight), lines) << "resumed at step " << stop;
    SCOPED_TRACE("resumed at step " + std::to_string(stop));
    expect_same_parameters(*a, *b);
  }
}

// The numbers of a metrics line whose keys start with one of `prefixes` (JSON numbers only).
std::map<std::string, double> metric_values(const std::string& line,
                                            const std::vector<std::string>& prefixes) {
  std::map<std::string, double> out;
  for (std::size_t q = line.find('"'); q != std::string::npos; q = line.find('"', q + 1)) {
    const std::size_t end = line.find('"', q + 1);
    if (end == std::string::npos) break;
    const std::string key = line.substr(q + 1, end - q - 1);
    q = end;
    if (line.compare(end + 1, 2, ": ") != 0) continue;
    for (const std::string& p : prefixes)
      if (key.rfind(p, 0) == 0) {
        char* stop = nullptr;
        const double v = std::strtod(line.c_str() + end + 3, &stop);
        if (stop != line.c_str() + end + 3) out[key] = v;
      }
  }
  return out;
}

// Gradient accumulation through the whole trainer: the same run with grad_accum 1, 2 and 4 (the
// loader's micro-batches, the loss bookkeeping, clipping and AdamW on the accumulated gradients,
// BlockFFN's adaptive coefficient, evaluation) logs the same losses, auxiliary losses, gradient
// norms and evaluation losses at every step and ends with the same parameters, in float64 to
// 1e-9. (Hydra's balance loss is a product of batch means, not a mean over micro-batches:
// docs/MODEL.md; BlockFFN's objective has none.)
TEST(Training, GradAccumulationEqualsOneStepThroughTheTrainer) {
  const std::vector<std::string> base = {"train.precision=FP64", "model.moe.objective=BLOCKFFN",
                                         "train.save_every=-1"};
  const std::vector<std::string> keys = {"loss", "grad_norm", "eval.loss"};
  std::vector<std::vector<std::map<std::string, double>>> runs;
  std::vector<std::vector<std::pair<std::string, std::vector<double>>>> params;
  for (int accum : {1, 2, 4}) {
    std::vector<std::string> sets = base;
    sets.push_back("train.grad_accum=" + std::to_string(accum));
    const std::string out = temp_dir("accum" + std::to_string(accum));
    std::unique_ptr<Trainer> t;
    auto s = train(small_config(sets), out, "", -1, &t);
    ASSERT_TRUE(s.ok()) << "grad_accum " << accum << ": " << s.status().message();
    std::ifstream in(out + "/metrics.jsonl");
    runs.emplace_back();
    for (std::string l; std::getline(in, l);) runs.back().push_back(metric_values(l, keys));
    params.emplace_back();
    for (const auto& p : t->model().named_parameters())
      params.back().emplace_back(p.name, p.tensor.to_vector<double>());
  }
  ASSERT_EQ(runs[0].size(), 8u);
  EXPECT_GT(runs[0].back().count("loss.sparsity"), 0u) << "the stage-two losses should be logged";
  EXPECT_GT(runs[0].back().count("eval.loss"), 0u);
  for (std::size_t r = 1; r < runs.size(); ++r) {
    ASSERT_EQ(runs[r].size(), runs[0].size());
    for (std::size_t step = 0; step < runs[0].size(); ++step) {
      ASSERT_EQ(runs[r][step].size(), runs[0][step].size()) << "step " << step + 1;
      for (const auto& [key, want] : runs[0][step])
        EXPECT_NEAR(runs[r][step].at(key), want, 1e-9 * std::max(1.0, std::abs(want)))
            << key << " at step " << step + 1 << ", grad_accum " << (r == 1 ? 2 : 4);
    }
    ASSERT_EQ(params[r].size(), params[0].size());
    for (std::size_t i = 0; i < params[0].size(); ++i) {
      const auto& [name, want] = params[0][i];
      const std::vector<double>& got = params[r][i].second;
      ASSERT_EQ(got.size(), want.size()) << name;
      double worst = 0;
      for (std::size_t e = 0; e < want.size(); ++e)
        worst = std::max(worst, std::abs(got[e] - want[e]) / std::max(1e-3, std::abs(want[e])));
      EXPECT_LT(worst, 1e-9) << name << ", grad_accum " << (r == 1 ? 2 : 4);
    }
  }
}

// BLOCKFFN's auxiliary losses fused (moe_aux, the default) and composed of separate ops train to
// the same losses, auxiliary losses, gradient norms and parameters (float64; the sums run in other
// orders, so within 1e-9 rather than bit for bit).
// A fused MoE op (toggled by `use`) trains as its composed reference: the same losses, gradient
// norms and parameters in float64 within 1e-9 (the sums run in another order).
void expect_fused_trains_as_composed(const std::function<void(bool)>& use,
                                     const std::string& name) {
  const std::vector<std::string> sets = {"train.precision=FP64", "model.moe.objective=BLOCKFFN",
                                         "train.save_every=-1"};
  const std::vector<std::string> keys = {"loss",          "loss.balance", "loss.locality",
                                         "loss.sparsity", "grad_norm",    "eval.loss"};
  std::vector<std::vector<std::map<std::string, double>>> runs;
  std::vector<std::vector<std::vector<double>>> params;
  for (bool fused : {true, false}) {
    use(fused);
    const std::string out = temp_dir(name + (fused ? "_fused" : "_composed"));
    std::unique_ptr<Trainer> t;
    auto s = train(small_config(sets), out, "", -1, &t);
    use(true);
    ASSERT_TRUE(s.ok()) << s.status().message();
    std::ifstream in(out + "/metrics.jsonl");
    runs.emplace_back();
    for (std::string l; std::getline(in, l);) runs.back().push_back(metric_values(l, keys));
    params.emplace_back();
    for (const auto& p : t->model().named_parameters())
      params.back().push_back(p.tensor.to_vector<double>());
  }
  ASSERT_EQ(runs[0].size(), runs[1].size());
  EXPECT_GT(runs[0].back().count("loss.sparsity"), 0u) << "the stage-two losses should be logged";
  for (std::size_t step = 0; step < runs[0].size(); ++step)
    for (const auto& [key, want] : runs[1][step])
      EXPECT_NEAR(runs[0][step].at(key), want, 1e-9 * std::max(1.0, std::abs(want)))
          << key << " at step " << step + 1;
  ASSERT_EQ(params[0].size(), params[1].size());
  for (std::size_t i = 0; i < params[0].size(); ++i)
    for (std::size_t e = 0; e < params[0][i].size(); ++e)
      ASSERT_NEAR(params[0][i][e], params[1][i][e],
                  1e-9 * std::max(1e-3, std::abs(params[1][i][e])))
          << "parameter " << i << " element " << e;
}

TEST(Training, FusedMoeAuxLossesTrainAsTheComposedOnes) {
  expect_fused_trains_as_composed(model::set_fused_moe_aux, "aux");
}

TEST(Training, FusedMoeCombineTrainsAsTheComposedOne) {
  expect_fused_trains_as_composed(model::set_fused_moe_combine, "combine");
}

TEST(Training, FusedBlockNormsTrainAsTheSingleNorms) {
  expect_fused_trains_as_composed(model::set_fused_block_norms, "norms");
}

// Two checkpoints hold the same tensors, checksum for checksum.
void expect_same_tensors(const std::string& a, const std::string& b) {
  auto ma = CheckpointManager::read_manifest(a);
  auto mb = CheckpointManager::read_manifest(b);
  ASSERT_TRUE(ma.ok() && mb.ok());
  ASSERT_EQ(ma->tensor_size(), mb->tensor_size());
  for (int i = 0; i < ma->tensor_size(); ++i) {
    EXPECT_EQ(ma->tensor(i).name(), mb->tensor(i).name());
    EXPECT_EQ(ma->tensor(i).crc32c(), mb->tensor(i).crc32c()) << ma->tensor(i).name();
  }
}

// train.overlap_steps: the small run queues steps 3, 4, 6 and 7 before reading the step before
// each (not after the first step, nor across the evaluations and saves at steps 4 and 8, nor the
// last, which reads statistics), and trains to the same metrics and parameters, bit for bit, as the
// run that reads every step before it queues the next.
TEST(Training, StepsQueuedAheadTrainAsStepsReadOneByOne) {
  const std::string ahead = temp_dir("ahead"), one = temp_dir("one_by_one");
  std::unique_ptr<Trainer> a, b;
  auto sa = train(small_config({"train.overlap_steps=true"}), ahead, "", -1, &a);
  ASSERT_TRUE(sa.ok()) << sa.status().message();
  auto sb = train(small_config({"train.overlap_steps=false"}), one, "", -1, &b);
  ASSERT_TRUE(sb.ok()) << sb.status().message();
  EXPECT_EQ(sa->queued_ahead, 4);
  EXPECT_EQ(sb->queued_ahead, 0);
  EXPECT_EQ(metric_lines(ahead), metric_lines(one));
  EXPECT_EQ(metric_lines(ahead).size(), 8u);
  expect_same_parameters(*a, *b);
  expect_same_tensors(ahead + "/checkpoints/step-00000008", one + "/checkpoints/step-00000008");
  // Saves every 3 steps, no evaluation before the last, statistics every 4 steps: steps 3 and 6
  // are queued ahead (saves after steps 3 and 6, step 5 starts stage two, step 8 reads
  // statistics).
  const std::vector<std::string> sets = {"train.save_every=3", "train.eval_every=0",
                                         "train.stats_every=4"};
  auto sc = train(small_config(sets), temp_dir("ahead3"));
  ASSERT_TRUE(sc.ok()) << sc.status().message();
  EXPECT_EQ(sc->queued_ahead, 2);
}

// A signal that arrives while step 2 is queued is seen at step 2's boundary, with step 3 already
// queued behind it: the run stops after step 3 with its checkpoint (a step queued is never lost
// nor saved half-done), and resuming from it trains as the uninterrupted run, bit for bit.
TEST(Training, SignalWithAStepQueuedAheadSavesAfterItAndResumesBitExact) {
  const std::string straight = temp_dir("sig_straight"), split = temp_dir("sig_split");
  std::unique_ptr<Trainer> a, b;
  ASSERT_TRUE(train(small_config(), straight, "", -1, &a).ok());
  ::setenv("HYDRA_TEST_SIGNAL_AT_STEP", "2", 1);
  auto first = train(small_config(), split);
  ::unsetenv("HYDRA_TEST_SIGNAL_AT_STEP");
  ASSERT_TRUE(first.ok()) << first.status().message();
  EXPECT_TRUE(first->interrupted);
  EXPECT_EQ(first->signal, SIGUSR1);
  EXPECT_EQ(first->last_step, 3);
  EXPECT_TRUE(fs::exists(split + "/checkpoints/step-00000003/manifest.pb"));
  auto second = train(small_config(), split, "auto", 8, &b);
  ASSERT_TRUE(second.ok()) << second.status().message();
  EXPECT_EQ(second->first_step, 3);
  EXPECT_EQ(metric_lines(straight), metric_lines(split));
  EXPECT_EQ(metric_lines(split).size(), 8u);
  expect_same_parameters(*a, *b);
}

// prepare_staging sets up the host buffers a save copies into, beforehand: a save after it sets up
// none (one without it sets up every tensor's), and writes the same checkpoint.
TEST(Checkpoints, PreparedBuffersLeaveTheFirstSaveNothingToSetUp) {
  const std::string dir = temp_dir("prepare");
  std::unique_ptr<Trainer> t;
  ASSERT_TRUE(train(small_config({"train.save_every=-1"}), dir + "/run", "", 2, &t).ok());
  const auto grid = parallel::ProcessGrid::single();
  TrainState state;
  state.step = 2;
  CheckpointManager plain(dir + "/plain", 2), prepared(dir + "/prepared", 2);
  prepared.prepare_staging(t->model(), t->optimizer(), *grid);
  auto a = plain.begin_save(state, t->config(), t->model(), t->optimizer(), *grid);
  auto b = prepared.begin_save(state, t->config(), t->model(), t->optimizer(), *grid);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_GT(a->allocated, 10) << "every tensor's buffer set up by the save";
  EXPECT_EQ(b->allocated, 0) << "prepared beforehand";
  EXPECT_EQ(a->bytes, b->bytes);
  ASSERT_TRUE(plain.finish_save(*grid).ok());
  ASSERT_TRUE(prepared.finish_save(*grid).ok());
  expect_same_tensors(plain.checkpoint_dir(2), prepared.checkpoint_dir(2));
  // Kept from save to save: the next one sets up nothing either.
  state.step = 3;
  auto c = plain.begin_save(state, t->config(), t->model(), t->optimizer(), *grid);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->allocated, 0);
  ASSERT_TRUE(plain.finish_save(*grid).ok());
  fs::remove_all(dir);
}

// On a GPU the buffers are page-locked host memory, set up as one mapping page-locked once (one
// driver allocation, not one per tensor: each held the training thread's CUDA calls), the tensors
// carved out of it; the checkpoint is the one a save setting up its own buffers writes. Skipped
// without a GPU (test_trainer runs on the GPU machine too).
TEST(Checkpoints, PreparedBuffersOnTheGpuAreOnePageLockedMapping) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device: GPU test skipped";
  const std::string dir = temp_dir("prepare_gpu");
  std::unique_ptr<Trainer> t;
  ASSERT_TRUE(
      train(small_config({"train.save_every=-1", "train.device=cuda"}), dir + "/run", "", 2, &t)
          .ok());
  const auto grid = parallel::ProcessGrid::single();
  TrainState state;
  state.step = 2;
  CheckpointManager prepared(dir + "/prepared", 2), plain(dir + "/plain", 2);
  const int64_t before = cuda_pinned_memory_stats().num_driver_allocations;
  prepared.prepare_staging(t->model(), t->optimizer(), *grid);
  auto b = prepared.begin_save(state, t->config(), t->model(), t->optimizer(), *grid);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->allocated, 0);
  EXPECT_EQ(cuda_pinned_memory_stats().num_driver_allocations - before, 1)
      << "one mapping for every tensor";
  auto a = plain.begin_save(state, t->config(), t->model(), t->optimizer(), *grid);
  ASSERT_TRUE(a.ok());
  EXPECT_GT(a->allocated, 10);
  EXPECT_EQ(a->bytes, b->bytes);
  ASSERT_TRUE(prepared.finish_save(*grid).ok());
  ASSERT_TRUE(plain.finish_save(*grid).ok());
  expect_same_tensors(plain.checkpoint_dir(2), prepared.checkpoint_dir(2));
  fs::remove_all(dir);
}

// A background save holds the step it was begun at, although training went on while its files were
// written (a slow disk: each write takes 300 ms, tens of steps of this model): the straight run's
// step-4 checkpoint, copied into a new run and resumed, reaches the straight run's final parameters
// and per-step metrics bit for bit. The report counts the saves and their stalls; every save is
// published.
TEST(Training, BackgroundSaveHoldsTheStepItBegan) {
  const std::string straight = temp_dir("bg_straight"), copy = temp_dir("bg_copy");
  const std::vector<std::string> sets = {"train.save_every=2", "train.async_save=true"};
  std::unique_ptr<Trainer> a, b;
  ::setenv("HYDRA_TEST_SLOW_WRITE_MS", "300", 1);
  auto sa = train(small_config(sets), straight, "", -1, &a);
  ::unsetenv("HYDRA_TEST_SLOW_WRITE_MS");
  ASSERT_TRUE(sa.ok()) << sa.status().message();
  EXPECT_EQ(sa->save_stall_s.size(), 4u);
  for (int step : {2, 4, 6, 8}) {
    char name[64];
    std::snprintf(name, sizeof name, "/checkpoints/step-%08d/manifest.pb", step);
    EXPECT_TRUE(fs::exists(straight + name)) << name;
  }
  fs::create_directories(copy + "/checkpoints");
  fs::copy(straight + "/checkpoints/step-00000004", copy + "/checkpoints/step-00000004",
           fs::copy_options::recursive);
  auto sb = train(small_config(sets), copy, copy + "/checkpoints/step-00000004", 8, &b);
  ASSERT_TRUE(sb.ok()) << sb.status().message();
  EXPECT_EQ(sb->first_step, 4);
  const std::vector<std::string> want = metric_lines(straight), got = metric_lines(copy);
  ASSERT_EQ(want.size(), 8u);
  ASSERT_EQ(got.size(), 4u);
  for (std::size_t i = 0; i < 4; ++i) EXPECT_EQ(got[i], want[i + 4]) << "step " << i + 5;
  expect_same_parameters(*a, *b);
}

TEST(Training, LossFallsAndMetricsHaveTheDocumentedKeys) {
  const std::string out = temp_dir("keys");
  config::RunConfig cfg = small_config();
  ASSERT_TRUE(config::apply_override(&cfg, "train.lr.lr=0.02").ok());
  auto s = train(cfg, out);
  ASSERT_TRUE(s.ok()) << s.status().message();
  EXPECT_LT(s->last_loss, s->first_loss);
  const std::vector<std::string> lines = metric_lines(out);
  std::ifstream in(out + "/metrics.jsonl");
  std::string last;
  for (std::string l; std::getline(in, l);) last = l;
  for (const char* key : {"\"step\": 8",
                          "\"stage\": \"two\"",
                          "\"loss\":",
                          "\"loss.balance\":",
                          "\"loss.locality\":",
                          "\"loss.sparsity\":",
                          "\"lr\":",
                          "\"grad_norm\":",
                          "\"tokens_per_s\":",
                          "\"tokens_seen\":",
                          "\"step_ms\":",
                          "\"host_queue_ms\":",
                          "\"host_wait_ms\":",
                          "\"model_tflops\":",
                          "\"elapsed_s\":",
                          "\"memory.rss_peak_mb\":",
                          "\"moe.0.load.1\":",
                          "\"moe.1.tls\":",
                          "\"moe.0.cls8\":",
                          "\"moe.0.router_entropy\":",
                          "\"workspace.0.write_gate_mean\":",
                          "\"pkm.0.value_coverage\":",
                          "\"eval.loss\":",
                          "\"eval.bits_per_byte\":",
                          "\"eval.accuracy.copying\":"})
    EXPECT_NE(last.find(key), std::string::npos) << key << " missing in " << last;
  EXPECT_FALSE(fs::is_empty(out + "/tb"));
  EXPECT_TRUE(fs::exists(out + "/config.pbtxt"));
}

TEST(Training, ModelStatisticsEveryStatsEverySteps) {
  const std::string out = temp_dir("stats_every");
  config::RunConfig cfg = small_config();
  ASSERT_TRUE(config::apply_override(&cfg, "train.stats_every=3").ok());
  ASSERT_TRUE(train(cfg, out).ok());
  const std::vector<std::string> lines = metric_lines(out);
  ASSERT_EQ(lines.size(), 8u);
  for (std::size_t i = 0; i < lines.size(); ++i) {
    const int64_t step = static_cast<int64_t>(i) + 1;
    const bool want = step % 3 == 0 || step == 8;  // and the schedule's last step
    EXPECT_EQ(lines[i].find("\"block.0.gate_norm.ssm\"") != std::string::npos, want)
        << "step " << step;
    EXPECT_NE(lines[i].find("\"grad_norm\""), std::string::npos) << "step " << step;
  }
}

// ---- bad input: clear errors, nothing damaged
// ---------------------------------------------------------

std::string error_of(const Expected<TrainSummary>& r) {
  return r.ok() ? "(no error)" : r.status().message();
}

TEST(BadInput, OutputDirectoryHoldingAnotherRunIsRefused) {
  const std::string out = temp_dir("occupied");
  ASSERT_TRUE(train(small_config(), out, "", 2).ok());
  const auto before = fs::last_write_time(out + "/metrics.jsonl");
  const std::string msg = error_of(train(small_config(), out));
  EXPECT_NE(msg.find("holds another run"), std::string::npos) << msg;
  EXPECT_NE(msg.find("--resume auto"), std::string::npos) << msg;
  EXPECT_EQ(fs::last_write_time(out + "/metrics.jsonl"), before);
}

TEST(BadInput, ResumeOfNothing) {
  const std::string msg = error_of(train(small_config(), temp_dir("empty"), "auto"));
  EXPECT_NE(msg.find("no complete checkpoint to resume from"), std::string::npos) << msg;
  EXPECT_NE(
      error_of(train(small_config(), temp_dir("x"), "/nonexistent/ckpt")).find("not a checkpoint"),
      std::string::npos);
}

TEST(BadInput, NcclForCpuTensors) {
  config::RunConfig cfg = small_config();
  ASSERT_TRUE(config::apply_override(&cfg, "parallel.comm=NCCL").ok());
  const std::string msg = error_of(train(cfg, temp_dir("nccl_cpu")));
  EXPECT_NE(msg.find("parallel.comm = NCCL moves CUDA tensors"), std::string::npos) << msg;
  EXPECT_NE(msg.find("parallel.comm = MPI"), std::string::npos) << msg;
}

TEST(BadInput, CheckpointOfAnotherConfig) {
  const std::string out = temp_dir("otherconfig");
  ASSERT_TRUE(train(small_config(), out, "", 4).ok());
  config::RunConfig other = small_config();
  ASSERT_TRUE(config::apply_override(&other, "model.moe.d_expert=12").ok());
  const std::string msg = error_of(train(other, out, "auto", 8));
  EXPECT_NE(msg.find("was written for another model config"), std::string::npos) << msg;
  EXPECT_NE(msg.find("d_expert"), std::string::npos) << msg;
}

TEST(BadInput, TruncatedCheckpointAndChecksumMismatch) {
  const std::string out = temp_dir("damaged");
  ASSERT_TRUE(train(small_config(), out, "", 4).ok());
  const std::string ckpt = out + "/checkpoints/step-00000004";
  // Checksum mismatch: the manifest's record of one tensor disagrees with the data.
  {
    auto man = CheckpointManager::read_manifest(ckpt);
    ASSERT_TRUE(man.ok());
    man->mutable_tensor(3)->set_crc32c(man->tensor(3).crc32c() ^ 1u);
    ASSERT_TRUE(CheckpointManager::write_manifest(ckpt, *man).ok());
    const std::string msg = error_of(train(small_config(), out, "auto", 8));
    EXPECT_NE(msg.find(" fails its checksum (the file is damaged)"), std::string::npos) << msg;
  }
  // A damaged manifest that still parses (one bit of its step): refused by its own checksum.
  {
    auto man = CheckpointManager::read_manifest(ckpt);
    ASSERT_TRUE(man.ok());
    std::string bytes;
    {
      std::ifstream in(ckpt + "/manifest.pb", std::ios::binary);
      bytes.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    }
    config::CheckpointManifest step_only;
    step_only.set_step(man->step());
    const std::string field = step_only.SerializeAsString();  // tag, then the varint 4
    const auto at = bytes.find(field);
    ASSERT_NE(at, std::string::npos);
    bytes[at + 1] = static_cast<char>(bytes[at + 1] ^ 8);  // step 4 -> 12
    std::ofstream(ckpt + "/manifest.pb", std::ios::binary | std::ios::trunc) << bytes;
    config::CheckpointManifest parsed;
    ASSERT_TRUE(parsed.ParseFromString(bytes));
    ASSERT_EQ(parsed.step(), 12);
    const std::string msg = error_of(train(small_config(), out, ckpt, 8));
    EXPECT_NE(msg.find("manifest.pb is damaged (it fails its checksum)"), std::string::npos) << msg;
    ASSERT_TRUE(CheckpointManager::write_manifest(ckpt, *man).ok());
  }
  // A record claiming fewer elements than its dataset holds: refused before reading (no overflow).
  {
    auto man = CheckpointManager::read_manifest(ckpt);
    ASSERT_TRUE(man.ok());
    man->mutable_tensor(3)->set_crc32c(man->tensor(3).crc32c() ^
                                       1u);  // the original checksum again
    int k = 0;
    while (k < man->tensor_size() &&
           (man->tensor(k).shape_size() == 0 || man->tensor(k).shape(0) < 2))
      ++k;
    ASSERT_LT(k, man->tensor_size());
    man->mutable_tensor(k)->set_shape(0, 1);
    ASSERT_TRUE(CheckpointManager::write_manifest(ckpt, *man).ok());
    const std::string msg = error_of(train(small_config(), out, "auto", 8));
    EXPECT_NE(msg.find("elements, manifest.pb says"), std::string::npos) << msg;
  }
  // Truncated rank file.
  fs::resize_file(ckpt + "/rank-00000.h5", fs::file_size(ckpt + "/rank-00000.h5") / 2);
  const std::string msg = error_of(train(small_config(), out, ckpt, 8));
  EXPECT_NE(msg.find("checkpoint " + ckpt), std::string::npos) << "[" << msg << "]";
  // A damaged manifest.
  std::ofstream(ckpt + "/manifest.pb", std::ios::binary) << "garbage";
  EXPECT_NE(error_of(train(small_config(), out, ckpt, 8)).find("manifest.pb is damaged"),
            std::string::npos);
  // A checkpoint without a manifest is not offered by --resume auto.
  fs::remove(ckpt + "/manifest.pb");
  EXPECT_NE(error_of(train(small_config(), out, "auto", 8)).find("no complete checkpoint"),
            std::string::npos);
}

// Every tensor a checkpoint holds (parameters, buffers, optimizer moments), by stored name, as
// bytes.
std::map<std::string, std::string> checkpointed_bytes(model::LanguageModel& m, const AdamW& opt) {
  std::map<std::string, std::string> out;
  auto add = [&](const std::string& name, const Tensor& t) {
    const Tensor c = t.detach().cpu().contiguous();
    out[name].assign(static_cast<const char*>(c.raw_data()), static_cast<std::size_t>(c.nbytes()));
  };
  for (const auto& p : m.named_parameters()) add("param/" + p.name, p.tensor);
  for (const auto& [n, t] : m.named_buffers()) add("buffer/" + n, t);
  for (const OptimizerState& st : opt.state()) add(st.name, st.tensor);
  return out;
}

// Writes the checkpoint `from` again into `to` in a sharded layout, as a run on two ranks would:
// each tensor of two or more elements split between rank-00000.h5 and rank-00001.h5, as row slices
// when it has two rows or more (expert shards), otherwise as ranges of the flat tensor (ZeRO-1).
void write_split_checkpoint(const std::string& from, const std::string& to) {
  auto man = CheckpointManager::read_manifest(from);
  ASSERT_TRUE(man.ok());
  auto tensors = stored_tensors(*man, from);
  ASSERT_TRUE(tensors.ok());
  fs::create_directories(to);
  auto f0 = data::Hdf5File::create(to + "/rank-00000.h5");
  auto f1 = data::Hdf5File::create(to + "/rank-00001.h5");
  ASSERT_TRUE(f0.ok() && f1.ok());
  config::CheckpointManifest split = *man;
  split.clear_tensor();
  StoredTensorReader reader(from);
  for (const StoredTensor& t : *tensors) {
    auto whole = reader.read(t);
    ASSERT_TRUE(whole.ok()) << whole.status().message();
    const data::Hdf5Type h5 = t.dtype == DType::kF64    ? data::Hdf5Type::kF64
                              : t.dtype == DType::kI64  ? data::Hdf5Type::kI64
                              : t.dtype == DType::kI32  ? data::Hdf5Type::kI32
                              : t.dtype == DType::kBF16 ? data::Hdf5Type::kU16
                                                        : data::Hdf5Type::kF32;
    const std::size_t elem = dtype_size(t.dtype);
    const int64_t n = whole->numel();
    const bool rows = t.shape.size() >= 1 && t.shape[0] >= 2;
    const int64_t cut = rows ? t.shape[0] / 2 : n / 2;  // rows, or elements
    const int64_t per_row = rows ? n / t.shape[0] : 1;
    for (int part = 0; part < (n >= 2 ? 2 : 1); ++part) {
      const int64_t lo = n >= 2 ? (part == 0 ? 0 : cut) : 0,
                    hi = n >= 2 ? (part == 0 ? cut : (rows ? t.shape[0] : n)) : n;
      Shape shape = rows ? t.shape : Shape{hi - lo};
      if (rows) shape[0] = hi - lo;
      if (n < 2) shape = t.shape;
      const char* src = static_cast<const char*>(whole->raw_data()) + lo * per_row * elem;
      const int64_t count = (hi - lo) * per_row;
      data::Hdf5File& f = part == 0 ? *f0 : *f1;
      ASSERT_TRUE(f.write(t.name, h5, shape, src).ok());
      config::TensorRecord* r = split.add_tensor();
      r->set_name(t.name);
      for (const int64_t d : shape) r->add_shape(d);
      for (const int64_t d : t.shape) r->add_full_shape(d);
      r->set_dtype(std::string(dtype_name(t.dtype)));
      r->set_file(part == 0 ? "rank-00000.h5" : "rank-00001.h5");
      r->set_crc32c(crc32c(src, static_cast<std::size_t>(count) * elem));
      if (n < 2 || rows) {
        for (std::size_t k = 0; k < t.shape.size(); ++k) r->add_offset(k == 0 && rows ? lo : 0);
      } else {
        r->set_flat_offset(lo);
      }
    }
  }
  ASSERT_TRUE(f0->flush().ok() && f1->flush().ok());
  ASSERT_TRUE(CheckpointManager::write_manifest(to, split).ok());
}

// A fuzzer of checkpoint loading, seeded and of a fixed budget (as the shard and config fuzzers): a
// saved checkpoint with its manifest's bytes damaged; or its fields set to impossible values,
// records duplicated, dropped or renamed, and the checksum made to match again (so that the checks
// behind it are reached); or its rank file's bytes damaged. Resuming from each case either fails
// with a message naming the checkpoint or restores exactly the tensors saved, and hydra-ckpt's
// reader reads each tensor exactly or refuses it; nothing throws or crashes (ASan: `make
// sanitize`).
TEST(BadInput, FuzzedCheckpointsAreRefusedOrLoadExactly) {
  const std::string out = temp_dir("ckptfuzz");
  ASSERT_TRUE(train(small_config(), out, "", 4).ok());
  const std::string good = out + "/checkpoints/step-00000004";
  auto manifest = CheckpointManager::read_manifest(good);
  ASSERT_TRUE(manifest.ok());
  config::RunConfig cfg;  // the run's resolved config, as the trainer loads with
  ASSERT_TRUE(config::parse_text(manifest->config_text(), "manifest", &cfg).ok());
  auto spec = model::make_spec(cfg.model(), "small.pbtxt");
  ASSERT_TRUE(spec.ok()) << spec.status().message();
  const auto grid = parallel::ProcessGrid::single();
  auto fresh = [&](uint64_t seed) {
    auto m = model::build_model(*spec, seed);
    auto o = std::make_unique<AdamW>(
        m->named_parameters(), cfg.train().optimizer(),
        std::map<std::string, double>{{"pkm_values", 1e-3}, {"moe_router", 1e-3}});
    return std::make_pair(std::move(m), std::move(o));
  };
  std::map<std::string, std::string> saved;
  {
    auto [m, o] = fresh(1);
    TrainState st;
    const Status ld = CheckpointManager::load(good, cfg, *m, *o, &st, *grid);
    ASSERT_TRUE(ld.ok()) << ld.message();
    saved = checkpointed_bytes(*m, *o);
  }
  auto slurp = [](const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  };
  // The same checkpoint in a sharded layout: it loads to the same tensors (resharding), and half
  // the cases damage it instead (slices and ranges: their coverage checks).
  const std::string sharded = out + "/sharded";
  ASSERT_NO_FATAL_FAILURE(write_split_checkpoint(good, sharded));
  {
    auto [m, o] = fresh(3);
    TrainState st;
    const Status ld = CheckpointManager::load(sharded, cfg, *m, *o, &st, *grid);
    ASSERT_TRUE(ld.ok()) << ld.message();
    ASSERT_TRUE(checkpointed_bytes(*m, *o) == saved);
  }
  struct Base {
    std::string manifest;
    config::CheckpointManifest parsed;
    std::vector<std::string> files, bytes;
  };
  std::vector<Base> bases;
  for (const std::string& b : {good, sharded}) {
    Base base;
    base.manifest = slurp(b + "/manifest.pb");
    auto parsed = CheckpointManager::read_manifest(b);
    ASSERT_TRUE(parsed.ok());
    base.parsed = *parsed;
    for (const auto& de : fs::directory_iterator(b))
      if (de.path().extension() == ".h5") {
        base.files.push_back(de.path().filename().string());
        base.bytes.push_back(slurp(de.path().string()));
      }
    bases.push_back(std::move(base));
  }

  testing::Fuzzer fz(20261205, 300);
  const int n = fz.cases();
  auto pick = [&](std::size_t k) { return fz.pick(k); };
  const int64_t extremes[] = {-1,
                              0,
                              1,
                              2,
                              3,
                              7,
                              int64_t{1} << 31,
                              int64_t{1} << 40,
                              int64_t{1} << 62,
                              std::numeric_limits<int64_t>::max(),
                              std::numeric_limits<int64_t>::min()};
  auto extreme = [&] { return extremes[pick(std::size(extremes))]; };
  // Field-level damage, then the manifest written with a checksum that matches.
  auto edit = [&](config::CheckpointManifest man) {
    for (int m = 1 + static_cast<int>(pick(2)); m > 0; --m) {
      const int i = static_cast<int>(pick(static_cast<std::size_t>(man.tensor_size())));
      config::TensorRecord* r = man.mutable_tensor(i);
      switch (pick(12)) {
        case 0:
          if (r->shape_size() > 0) r->set_shape(static_cast<int>(pick(r->shape_size())), extreme());
          break;
        case 1:
          if (r->full_shape_size() > 0)
            r->set_full_shape(static_cast<int>(pick(r->full_shape_size())), extreme());
          break;
        case 2:
          if (r->offset_size() > 0)
            r->set_offset(static_cast<int>(pick(r->offset_size())), extreme());
          else
            r->add_offset(extreme());
          break;
        case 3:
          r->set_flat_offset(extreme());
          break;
        case 4: {
          const char* dtypes[] = {"f32", "f64", "bf16", "i64", "i32", "", "f16", "float"};
          r->set_dtype(dtypes[pick(std::size(dtypes))]);
          break;
        }
        case 5: {
          const char* files[] = {"",
                                 ".",
                                 "..",
                                 "../rank-00000.h5",
                                 "/etc/passwd",
                                 "rank-00001.h5",
                                 "manifest.pb",
                                 "rank-00000.h5"};
          r->set_file(files[pick(std::size(files))]);
          break;
        }
        case 6:
          r->set_name(man.tensor(static_cast<int>(pick(man.tensor_size()))).name());
          break;
        case 7:
          r->set_crc32c(r->crc32c() ^ (1u << pick(32)));
          break;
        case 8: {  // a second record of the tensor, perhaps shifted
          config::TensorRecord copy = *r;
          if (copy.offset_size() > 0 && pick(2) == 0) copy.set_offset(0, copy.offset(0) + 1);
          if (copy.has_flat_offset() && pick(2) == 0) copy.set_flat_offset(copy.flat_offset() - 1);
          *man.add_tensor() = copy;
          break;
        }
        case 9:
          man.mutable_tensor()->DeleteSubrange(i, 1);
          break;
        case 10:
          r->clear_shape();
          break;
        default:
          switch (pick(6)) {
            case 0:
              man.set_step(extreme());
              break;
            case 1:
              man.set_stage(extreme());
              break;
            case 2:
              man.set_world_size(extreme());
              break;
            case 3:
              man.set_tokens_seen(pick(2) ? std::nan("") : -1.0);
              break;
            case 4:
              man.set_config_text(fz.damage(man.config_text(), 64));
              break;
            default:
              man.set_ep(extreme());
          }
      }
    }
    return man;
  };

  int refused = 0, loaded = 0;
  std::string kept;
  const std::string dir = out + "/checkpoints/step-00000099";
  // hydra-ckpt's path: every tensor the manifest lists, read whole, exactly or refused.
  auto read_like_hydra_ckpt = [&](int c) {
    auto man = CheckpointManager::read_manifest(dir);
    if (!man.ok()) return;
    auto tensors = stored_tensors(*man, dir);
    if (!tensors.ok()) return;
    StoredTensorReader reader(dir);
    for (const StoredTensor& t : *tensors) {
      auto read = reader.read(t);
      if (!read.ok()) {
        EXPECT_NE(read.status().message().find(dir), std::string::npos) << read.status().message();
        continue;
      }
      const auto it = saved.find(t.name);
      if (it == saved.end()) continue;  // a name the manifest was given
      const Tensor& r = *read;
      EXPECT_EQ(
          std::string(static_cast<const char*>(r.raw_data()), static_cast<std::size_t>(r.nbytes())),
          it->second)
          << "case " << c << ": hydra-ckpt read other bytes for " << t.name;
    }
  };
  for (int c = 0; c < n; ++c) {
    fs::remove_all(dir);
    fs::create_directories(dir);
    const int kind = static_cast<int>(pick(3));
    const Base& base = bases[pick(bases.size())];
    const std::size_t hit = pick(base.files.size());  // the rank file kind 2 damages
    for (std::size_t f = 0; f < base.files.size(); ++f)
      std::ofstream(dir + "/" + base.files[f], std::ios::binary)
          << (kind == 2 && f == hit ? fz.damage(base.bytes[f], 4096) : base.bytes[f]);
    if (kind == 1) {
      ASSERT_TRUE(CheckpointManager::write_manifest(dir, edit(base.parsed)).ok());
    } else {
      std::ofstream(dir + "/manifest.pb", std::ios::binary)
          << (kind == 0 ? fz.damage(base.manifest, base.manifest.size()) : base.manifest);
    }
    try {
      auto [m, o] = fresh(2);
      TrainState st;
      const Status ld = CheckpointManager::load(dir, cfg, *m, *o, &st, *grid);
      if (ld.ok()) {
        ++loaded;
        EXPECT_TRUE(checkpointed_bytes(*m, *o) == saved)
            << "case " << c << " (kind " << kind << ") loaded other tensors";
      } else {
        ++refused;
        EXPECT_NE(ld.message().find("checkpoint " + dir), std::string::npos)
            << "case " << c << ": " << ld.message();
      }
      read_like_hydra_ckpt(c);
    } catch (const std::exception& e) {
      ADD_FAILURE() << "case " << c << " (kind " << kind << ") threw: " << e.what();
    }
    // The first failing case is kept to look at (its files hold timestamps: a seed alone does not
    // make it again).
    if (HasFailure() && kept.empty()) {
      kept = out + "/failed-case-" + std::to_string(c);
      fs::rename(dir, kept);
      ADD_FAILURE() << "case " << c << " kept in " << kept;
    }
  }
  EXPECT_GT(refused, n / 2);
  if (n >= 100) {
    EXPECT_GT(loaded, 0);  // damage that changes nothing a load uses (unused bytes)
  }
  std::printf("checkpoint fuzz: %d cases, %d refused, %d loaded exactly\n", n, refused, loaded);
}

// A run stopped before its first checkpoint was published (a requeued Slurm job killed early) holds
// its config and metrics and at most a .tmp checkpoint: --resume auto starts it again from step 0,
// with the same metrics as a run never stopped. A run directory with nothing in it stays an error.
TEST(Resume, AutoRestartsARunThatPublishedNoCheckpoint) {
  const std::string straight = temp_dir("never_stopped"), stopped = temp_dir("stopped_early");
  ASSERT_TRUE(train(small_config(), straight).ok());
  ASSERT_TRUE(train(small_config(), stopped, "", 3).ok());
  fs::remove_all(stopped + "/checkpoints");
  fs::create_directories(stopped + "/checkpoints/step-00000004.tmp");
  std::ofstream(stopped + "/checkpoints/step-00000004.tmp/rank-00000.h5") << "half written";
  ASSERT_TRUE(fs::exists(stopped + "/config.pbtxt"));
  const auto r = train(small_config(), stopped, "auto");
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->first_step, 0);
  EXPECT_EQ(metric_lines(stopped), metric_lines(straight));
  EXPECT_FALSE(fs::exists(stopped + "/checkpoints/step-00000004.tmp"));
  const std::string empty = temp_dir("nothing_there");
  fs::create_directories(empty);
  EXPECT_NE(error_of(train(small_config(), empty, "auto")).find("holds no run to resume"),
            std::string::npos);
}

// --resume auto on a run whose newest checkpoint is damaged names the next older complete one (it
// only refused before), and that one resumes.
TEST(BadInput, DamagedNewestCheckpointNamesTheOlderOne) {
  const std::string out = temp_dir("damaged_newest");
  ASSERT_TRUE(train(small_config(), out, "", 8).ok());
  const std::string newest = out + "/checkpoints/step-00000008",
                    older = out + "/checkpoints/step-00000004";
  ASSERT_TRUE(fs::exists(older + "/manifest.pb"));
  auto man = CheckpointManager::read_manifest(newest);
  ASSERT_TRUE(man.ok());
  man->mutable_tensor(3)->set_crc32c(man->tensor(3).crc32c() ^ 1u);
  ASSERT_TRUE(CheckpointManager::write_manifest(newest, *man).ok());
  const std::string msg = error_of(train(small_config(), out, "auto", 8));
  EXPECT_NE(msg.find(" fails its checksum (the file is damaged)"), std::string::npos) << msg;
  EXPECT_NE(msg.find("the next older complete checkpoint is " + older +
                     ": resume from it with --resume " + older + " --force"),
            std::string::npos)
      << msg;
  // As the message says: without --force the damaged newer one would stay in the way (lineage).
  EXPECT_FALSE(train(small_config(), out, older, 8).ok());
  EXPECT_TRUE(train(small_config(), out, older, 8, nullptr, /*force=*/true).ok());
  EXPECT_TRUE(fs::exists(out + "/abandoned/branch-1/checkpoints/step-00000008"));
}

TEST(BadInput, MissingCorruptAndOutOfVocabularyShards) {
  const std::string dir = temp_dir("shards");
  fs::create_directories(dir);
  EXPECT_NE(error_of(train(small_config({"data.shards=" + dir + "/none.h5"}), temp_dir("s1")))
                .find("none.h5: no such token shard"),
            std::string::npos);
  std::ofstream(dir + "/bad.h5") << "junk";
  EXPECT_NE(error_of(train(small_config({"data.shards=" + dir + "/bad.h5"}), temp_dir("s2")))
                .find("bad.h5"),
            std::string::npos);
  // A shard whose vocabulary is larger than the model's.
  std::vector<int32_t> tokens(4000, 1);
  ASSERT_TRUE(data::write_token_shard(dir + "/big.h5", tokens, {0}, "bpe-500-x", 500).ok());
  EXPECT_NE(error_of(train(small_config({"data.shards=" + dir + "/big.h5"}), temp_dir("s3")))
                .find("do not fit model.vocab_size = 128"),
            std::string::npos);
  // A token outside the shard's own vocabulary, found while training.
  for (int i = 0; i < 4000; i += 3) tokens[i] = 200;
  ASSERT_TRUE(data::write_token_shard(dir + "/oov.h5", tokens, {0}, "bytes", 128).ok());
  const std::string msg =
      error_of(train(small_config({"data.shards=" + dir + "/oov.h5"}), temp_dir("s4")));
  EXPECT_NE(msg.find("token 200"), std::string::npos) << msg;
  EXPECT_NE(msg.find("outside the shard's vocabulary of 128"), std::string::npos) << msg;
}

TEST(BadInput, TrainsOnTokenShards) {
  const std::string dir = temp_dir("goodshards");
  fs::create_directories(dir);
  std::vector<int32_t> tokens(6000);
  for (int i = 0; i < 6000; ++i) tokens[i] = (i * 31 + i / 7) % 128;
  ASSERT_TRUE(data::write_token_shard(dir + "/a.h5", tokens, {0, 3000}, "bytes", 128).ok());
  auto s = train(small_config({"data.shards=" + dir, "data.eval_fraction=0.1"}), temp_dir("s5"));
  ASSERT_TRUE(s.ok()) << s.status().message();
  EXPECT_EQ(s->last_step, 8);
  EXPECT_EQ(s->eval.answers[0], 0);  // no synthetic answers in real text
}

}  // namespace
}  // namespace hydra::trainer
