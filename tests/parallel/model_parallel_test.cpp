// The tiny model with every path on, split over a process grid, against one process on the same
// global batch: the loss and every parameter's gradient (float64), and 20 training steps (the real
// trainer, float32). Run under mpirun: each test runs when the world has its grid's size and skips
// otherwise.
//
// Tolerances. Float64 gradients: the split computes the same sums in another order (per-rank
// partial sums, then the all-reduce), so they differ by a few ulps of the largest partial sum:
// relative error < 1e-10 leaves five orders of magnitude of margin over the ~1e-15 observed while
// any real mistake (a missing halo, a wrong normaliser, a dropped exchange) shows up at 1e-3 or
// more. Training: 20 AdamW steps in float64 (train.precision = FP64). In float32 the reordering
// (~1e-7 per step) sooner or later flips a discrete choice (an expert's top-k, a PKM key) and the
// runs part ways after ~10 steps; in float64 the same reordering stays near 1e-15 per step and the
// parameters agree to < 1e-9.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>

#include "autograd/cuda_context.h"
#include "configs/config_io.h"
#include "parallel/runtime.h"
#include "tests/model/model_util.h"
#include "tests/test_util.h"
#include "trainer/distributed.h"
#include "trainer/step.h"
#include "trainer/trainer.h"

namespace hydra {
namespace {

using parallel::GridShape;
using parallel::ProcessGrid;

constexpr int64_t kBatch = 4, kLen = 128;

void expect_aux_near(const model::AuxLosses& got, const model::AuxLosses& want) {
  const auto near = [](double g, double w, const char* name) {
    EXPECT_NEAR(g, w, 1e-12 + 1e-10 * std::abs(w)) << name;
  };
  near(got.balance, want.balance, "balance");
  near(got.locality, want.locality, "locality");
  near(got.sparsity, want.sparsity, "sparsity");
}

data::Batch global_batch(uint64_t seed) {
  data::Batch b;
  b.batch = kBatch;
  b.len = kLen;
  Generator g(seed);
  b.tokens = randint(0, 256, {kBatch, kLen}, g).to_vector<int64_t>();
  b.targets = randint(0, 256, {kBatch, kLen}, g).to_vector<int64_t>();
  for (std::size_t i = 0; i < b.targets.size(); i += 7)
    b.targets[i] = model::LanguageModel::kIgnoreIndex;
  b.answer.assign(b.tokens.size(), -1);
  b.level.assign(b.tokens.size(), -1);
  b.domain.assign(b.tokens.size(), -1);
  return b;
}

data::Batch sequences(const data::Batch& b, int64_t first, int64_t count) {
  data::Batch out;
  out.batch = count;
  out.len = b.len;
  const auto span = [&](const auto& v) {
    using V = std::decay_t<decltype(v)>;
    return V(v.begin() + first * b.len, v.begin() + (first + count) * b.len);
  };
  out.tokens = span(b.tokens);
  out.targets = span(b.targets);
  out.answer = span(b.answer);
  out.level = span(b.level);
  out.domain = span(b.domain);
  return out;
}

// The tiny config, or a variant of it (`edit`: kBlockFfn, kSsd).
using ConfigEdit = std::function<void(config::ModelConfig*)>;
// The MoE trained with BlockFFN's objective (its losses' sums and counts over the ranks).
const ConfigEdit kBlockFfn = [](config::ModelConfig* c) {
  c->mutable_moe()->set_objective(config::MoeConfig::BLOCKFFN);
};
// The scan in the SSD form (8 heads of 16 channels).
const ConfigEdit kSsd = [](config::ModelConfig* c) {
  c->mutable_ssm()->set_form(config::SsmConfig::SSD);
  c->mutable_ssm()->set_head_dim(16);
};

// The paper's form of the SSM: one state per channel, no convolution (no halo).
const ConfigEdit kPaperSsm = [](config::ModelConfig* c) {
  c->mutable_ssm()->set_d_state(1);
  c->mutable_ssm()->set_conv_width(0);
};

// The tests' 128-token sequences split 4 ways into shards of 32 tokens (4 MoE chunks); BLOCKFFN's
// sparsification groups of 64 tokens would straddle them (hydra-train refuses that layout), so the
// tests use groups of 4 chunks.
constexpr int64_t kTestSparsityGroup = 4;

std::unique_ptr<model::LanguageModel> tiny_model(DType dtype, const ConfigEdit& edit = nullptr) {
  auto m = model::build_model(
      testing::shipped_spec("tiny",
                            [&](config::ModelConfig* c) {
                              c->mutable_moe()->set_sparsity_group(kTestSparsityGroup);
                              if (edit) edit(c);
                            }),
      7);
  m->to(dtype);
  return m;
}

// A grid of `shape` over the world, or null when the world has another size (the test then skips).
// gpu: its tensors on this rank's GPU, moved by `backend`.
std::unique_ptr<ProcessGrid> grid_of(const GridShape& shape, bool gpu = false,
                                     parallel::CommBackend backend = parallel::CommBackend::kAuto) {
  auto world = parallel::world_communicator(gpu, backend);
  if (world->size() != shape.size()) return nullptr;
  auto g = ProcessGrid::create(std::move(world), shape, "test");
  EXPECT_TRUE(g.ok()) << g.status().message();
  return g.ok() ? std::move(*g) : nullptr;
}

struct OnGpu {
  bool on = false;
  parallel::CommBackend backend = parallel::CommBackend::kAuto;
};

// preset: every gradient starts as a zero tensor of its own, so the reducer copies them into its
// buckets (as after earlier micro-batches) instead of the backward writing into the buckets
// directly. gpu.on: the grid runs on the GPU (float64 kernels) against the one process on the CPU.
void expect_same_step(const GridShape& shape, bool preset = false, OnGpu gpu = {},
                      const ConfigEdit& edit = nullptr) {
  auto grid = grid_of(shape, gpu.on, gpu.backend);
  if (!grid) GTEST_SKIP() << "needs " << shape.size() << " ranks";
  const data::Batch batch = global_batch(11);
  trainer::StepSettings s;  // every path on
  auto ref = tiny_model(DType::kF64, edit);
  const auto single = ProcessGrid::single();
  const trainer::StepLosses want = trainer::forward_backward(*ref, *single, nullptr, batch, s);

  auto dist = tiny_model(DType::kF64, edit);
  if (gpu.on) {
    s.device = grid->world().device();
    dist->to(s.device);
  }
  if (shape.ep > 1) dist->shard_experts(grid->ep_rank(), shape.ep);
  auto reducer = trainer::make_reducer(*dist, *grid, 1.0 / 64);  // small buckets: several per step
  const int64_t per = kBatch / grid->data_ranks();
  const data::Batch local = trainer::sequence_shard(sequences(batch, grid->data_rank() * per, per),
                                                    grid->sp_rank(), shape.sp);
  if (preset)
    for (const auto& p : dist->named_parameters())
      if (!p.options.sparse_grad) p.tensor.set_grad(zeros_like(p.tensor));
  const trainer::StepLosses got = trainer::forward_backward(*dist, *grid, reducer.get(), local, s);

  EXPECT_NEAR(got.lm, want.lm, 1e-12 * std::abs(want.lm));
  EXPECT_NEAR(got.total, want.total, 1e-12 * std::abs(want.total));
  expect_aux_near(got.aux, want.aux);
  EXPECT_GT(reducer->stats().buckets, 1);
  int64_t dense = 0;
  for (const auto& p : dist->named_parameters()) dense += !p.options.sparse_grad;
  // The backward wrote every gradient into its bucket, unless the gradients existed before it.
  EXPECT_EQ(reducer->stats().copied, preset ? dense : 0);

  const auto want_p = ref->named_parameters(), got_p = dist->named_parameters();
  ASSERT_EQ(want_p.size(), got_p.size());
  int checked = 0;
  double worst = 0;  // the largest relative error of a gradient: the tolerance's margin, printed
  for (std::size_t i = 0; i < want_p.size(); ++i) {
    const Tensor& w = want_p[i].tensor;
    const Tensor& g = got_p[i].tensor;
    ASSERT_EQ(want_p[i].name, got_p[i].name);
    Tensor wg = w.sparse_grad() ? densify_sparse_grad(w) : w.grad();
    Tensor gg = g.sparse_grad() ? densify_sparse_grad(g) : g.grad();
    ASSERT_TRUE(wg.defined()) << want_p[i].name;
    ASSERT_TRUE(gg.defined()) << got_p[i].name << " got no gradient";
    gg = gg.cpu();
    if (gg.shape() != wg.shape()) {  // an expert shard: this rank's experts of the full tensor
      ASSERT_TRUE(trainer::is_expert_parameter(got_p[i].name)) << got_p[i].name;
      wg = wg.narrow(0, grid->ep_rank() * gg.size(0), gg.size(0));
    }
    const double err = testing::rel_error(gg, wg);
    EXPECT_LT(err, 1e-10) << got_p[i].name;
    worst = std::max(worst, err);
    ++checked;
  }
  EXPECT_EQ(checked, static_cast<int>(want_p.size()));
  if (grid->world().rank() == 0)
    std::printf(
        "grid %s%s: loss relative error %.1e (tolerance 1e-12), worst gradient %.1e (1e-10)\n",
        shape.str().c_str(), gpu.on ? " on the GPU" : "",
        std::abs(got.total - want.total) / std::abs(want.total), worst);
}

// Gradient accumulation: a step over 2 micro-batches equals one step over the whole batch (losses,
// auxiliary losses, every gradient, the PKM values' sparse one accumulated across micro-batches).
// The balance loss is off: it multiplies two batch means (the routers' weights and the experts'
// loads), so over micro-batches it is the mean of their products, not the product of the batch's
// means (docs/MODEL.md); every other term is a mean over the batch's own counts. One process.
void expect_accumulation_equals_one_step(const ConfigEdit& edit) {
  const data::Batch batch = global_batch(13);
  const auto single = ProcessGrid::single();
  const ConfigEdit no_balance = [&](config::ModelConfig* c) {
    if (edit) edit(c);
    c->mutable_moe()->set_balance_loss_weight(0);
  };
  trainer::StepSettings s;  // every path on
  auto one = tiny_model(DType::kF64, no_balance), two = tiny_model(DType::kF64, no_balance);
  const trainer::StepLosses want = trainer::forward_backward(*one, *single, nullptr, batch, s);
  s.grad_accum = 2;
  const trainer::StepLosses got = trainer::forward_backward(*two, *single, nullptr, batch, s);
  EXPECT_NEAR(got.lm, want.lm, 1e-12 * std::abs(want.lm));
  EXPECT_NEAR(got.total, want.total, 1e-12 * std::abs(want.total));
  expect_aux_near(got.aux, want.aux);
  EXPECT_GT(want.aux.sparsity, 0) << "the sparsification loss should be on";
  const auto a = one->named_parameters(), b = two->named_parameters();
  ASSERT_EQ(a.size(), b.size());
  for (std::size_t i = 0; i < a.size(); ++i) {
    const Tensor ga =
        a[i].tensor.sparse_grad() ? densify_sparse_grad(a[i].tensor) : a[i].tensor.grad();
    const Tensor gb =
        b[i].tensor.sparse_grad() ? densify_sparse_grad(b[i].tensor) : b[i].tensor.grad();
    ASSERT_TRUE(ga.defined() && gb.defined()) << a[i].name;
    EXPECT_LT(testing::rel_error(gb, ga), 1e-10) << a[i].name;
  }
}

TEST(ModelParallel, GradAccumulationOverTwoMicroBatchesEqualsOneStep) {
  expect_accumulation_equals_one_step(nullptr);
}
TEST(ModelParallel, GradAccumulationEqualsOneStepBlockFfnObjective) {
  expect_accumulation_equals_one_step(kBlockFfn);
}

TEST(ModelParallel, DataParallel2SameLossAndGradients) { expect_same_step({2, 1, 1}); }
TEST(ModelParallel, DataParallel4SameLossAndGradients) { expect_same_step({4, 1, 1}); }
TEST(ModelParallel, DataParallel2OntoExistingGradientsSameLossAndGradients) {
  expect_same_step({2, 1, 1}, true);
}
TEST(ModelParallel, ExpertParallel2SameLossAndGradients) { expect_same_step({1, 2, 1}); }
TEST(ModelParallel, ExpertParallel4SameLossAndGradients) { expect_same_step({1, 4, 1}); }
TEST(ModelParallel, DataTimesExpertParallel2x2SameLossAndGradients) { expect_same_step({2, 2, 1}); }
TEST(ModelParallel, SequenceParallel2SameLossAndGradients) { expect_same_step({1, 1, 2}); }
// BlockFFN's objective: token-pair locality across the shard boundary, 64-token groups (whole in a
// shard of 64 tokens), no balance loss.
TEST(ModelParallel, SequenceParallel2BlockFfnObjectiveSameLossAndGradients) {
  expect_same_step({1, 1, 2}, false, {}, kBlockFfn);
}
TEST(ModelParallel, SequenceParallel2SsdFormSameLossAndGradients) {
  expect_same_step({1, 1, 2}, false, {}, kSsd);
}
TEST(ModelParallel, SequenceParallel2PaperFormSameLossAndGradients) {
  expect_same_step({1, 1, 2}, false, {}, kPaperSsm);
}
TEST(ModelParallel, SequenceParallel4SsdFormSameLossAndGradients) {
  expect_same_step({1, 1, 4}, false, {}, kSsd);
}
TEST(ModelParallel, DataTimesExpertParallel2x2BlockFfnObjectiveSameLossAndGradients) {
  expect_same_step({2, 2, 1}, false, {}, kBlockFfn);
}
TEST(ModelParallel, SequenceParallel4SameLossAndGradients) { expect_same_step({1, 1, 4}); }
TEST(ModelParallel, DataTimesSequenceParallel2x2SameLossAndGradients) {
  expect_same_step({2, 1, 2});
}
TEST(ModelParallel, ExpertTimesSequenceParallel2x2SameLossAndGradients) {
  expect_same_step({1, 2, 2});
}

// The same on GPUs: NCCL when this host has a GPU per rank, and always (given one GPU) MPI with the
// tensors staged through host memory, so a one-GPU machine checks the GPU kernels under every grid.
std::vector<parallel::CommBackend> gpu_backends() {
  std::vector<parallel::CommBackend> out;
  if (!cuda_available()) return out;
  out.push_back(parallel::CommBackend::kMpi);
  if (cuda_device_count() >= parallel::process_info().local_size)
    out.push_back(parallel::CommBackend::kNccl);
  return out;
}

void expect_same_step_on_gpu(const GridShape& shape) {
  const auto backends = gpu_backends();
  if (backends.empty())
    GTEST_SKIP() << "no CUDA device (or a build without HYDRA_CUDA): GPU test skipped";
  for (const parallel::CommBackend b : backends) {
    SCOPED_TRACE(b == parallel::CommBackend::kNccl ? "NCCL" : "MPI staged through host memory");
    expect_same_step(shape, false, {true, b});
  }
}

TEST(ModelParallelGpu, DataParallel2SameLossAndGradients) { expect_same_step_on_gpu({2, 1, 1}); }
TEST(ModelParallelGpu, ExpertParallel2SameLossAndGradients) { expect_same_step_on_gpu({1, 2, 1}); }
TEST(ModelParallelGpu, SequenceParallel2SameLossAndGradients) {
  expect_same_step_on_gpu({1, 1, 2});
}
TEST(ModelParallelGpu, SequenceParallel4SameLossAndGradients) {
  expect_same_step_on_gpu({1, 1, 4});
}
TEST(ModelParallelGpu, DataTimesExpertParallel2x2SameLossAndGradients) {
  expect_same_step_on_gpu({2, 2, 1});
}
TEST(ModelParallelGpu, ExpertTimesSequenceParallel2x2SameLossAndGradients) {
  expect_same_step_on_gpu({1, 2, 2});
}

// 20 steps of the real trainer on the grid and in one process: the same parameters. With zero1 the
// optimizer state is sharded (ZeRO-1); the run also stops at step 10, resumes from its checkpoint
// on the same grid (bit for bit the straight run), and that checkpoint resumes in one process
// (resharded moments) to the one process's parameters.
config::RunConfig training_config() {
  auto cfg = config::load_run_config(std::string(HYDRA_SOURCE_DIR) + "/configs/tiny.pbtxt");
  EXPECT_TRUE(cfg.ok());
  for (const char* set :
       {"curriculum={}", "train.steps=20", "train.batch_size=4", "train.seq_len=128",
        "train.eval_every=0", "train.save_every=0", "train.lr.warmup_steps=2",
        "train.precision=FP64", "model.moe.sparsity_group=4" /* kTestSparsityGroup */})
    EXPECT_TRUE(config::apply_override(&*cfg, set).ok()) << set;
  return *cfg;
}

std::unique_ptr<trainer::Trainer> train(const config::RunConfig& c, const std::string& out,
                                        bool local, int64_t stop = -1,
                                        const std::string& resume = "") {
  trainer::TrainOptions o;
  o.out_dir = out;
  o.quiet = true;
  o.local_only = local;
  o.stop_step = stop;
  o.resume = resume;
  auto t = trainer::Trainer::create(c, "tiny.pbtxt", o);
  EXPECT_TRUE(t.ok()) << t.status().message();
  if (!t.ok()) return nullptr;
  auto r = (*t)->run();
  EXPECT_TRUE(r.ok()) << r.status().message();
  return std::move(*t);
}

// Every parameter of `got` (this rank's expert shard where the shapes differ) against `want`.
void expect_same_parameters(trainer::Trainer& got, trainer::Trainer& want, int64_t ep_rank,
                            double tol) {
  const auto d = got.model().named_parameters(), s = want.model().named_parameters();
  ASSERT_EQ(d.size(), s.size());
  double worst = 0;
  for (std::size_t i = 0; i < d.size(); ++i) {
    Tensor w = s[i].tensor;
    if (w.shape() != d[i].tensor.shape())
      w = w.narrow(0, ep_rank * d[i].tensor.size(0), d[i].tensor.size(0));
    if (tol == 0) {
      EXPECT_TRUE(testing::bitwise_equal(d[i].tensor, w)) << d[i].name;
    } else {
      const double err = testing::rel_error(d[i].tensor, w);
      EXPECT_LT(err, tol) << d[i].name;
      worst = std::max(worst, err);
    }
  }
  if (tol > 0 && parallel::process_info().rank == 0)
    std::printf("parameters after training: worst relative error %.1e (tolerance %.0e)\n", worst,
                tol);
}

void expect_same_training(const GridShape& shape, bool zero1 = false) {
  {
    auto probe = parallel::world_communicator(false);
    if (probe->size() != shape.size()) GTEST_SKIP() << "needs " << shape.size() << " ranks";
  }
  auto world = parallel::world_communicator(false);
  const std::string base =
      std::string(HYDRA_BINARY_DIR) + "/mpi-runs/" + shape.str() + (zero1 ? "-zero1" : "");
  if (world->rank() == 0) std::filesystem::remove_all(base);
  world->barrier();
  const config::RunConfig cfg = training_config();
  config::RunConfig dcfg = cfg;
  dcfg.mutable_parallel()->set_dp(shape.dp);
  dcfg.mutable_parallel()->set_ep(shape.ep);
  dcfg.mutable_parallel()->set_sp(shape.sp);
  dcfg.mutable_parallel()->set_zero1(zero1);
  dcfg.mutable_parallel()->set_bucket_mb(1.0 / 64);  // several buckets, ranges that cut parameters
  auto dist = train(dcfg, base + "/grid", false);
  const std::string mine = "/single-" + std::to_string(world->rank());
  auto single = train(cfg, base + mine, true);
  ASSERT_TRUE(dist && single);
  const int64_t ep_rank = (world->rank() / shape.sp) % shape.ep;
  expect_same_parameters(*dist, *single, ep_rank, 1e-9);
  if (!zero1) return;

  // Each moment element lives on exactly one rank (the row-sparse PKM values' by rows): summed over
  // the world, the state is the one process's.
  const double total = world->all_reduce_host(double(dist->optimizer().state_bytes()));
  EXPECT_EQ(total, double(single->optimizer().state_bytes()));
  // Both gathers ran: parameters alone in their bucket in place, the others packed and unpacked.
  ASSERT_NE(dist->reducer(), nullptr);
  EXPECT_GT(dist->reducer()->stats().gathered_in_place, 0);
  EXPECT_GT(dist->reducer()->stats().gathered_packed, 0);

  // Stop at 10, resume on the grid: the straight run bit for bit.
  auto half = train(dcfg, base + "/half", false, 10);
  ASSERT_TRUE(half);
  const std::string ckpt = base + "/half/checkpoints/step-00000010";
  auto resumed = train(dcfg, base + "/half", false, 20, "auto");
  ASSERT_TRUE(resumed);
  expect_same_parameters(*resumed, *dist, 0, 0.0);
  // The ZeRO-1 checkpoint in one process: its moments are assembled from every rank's ranges.
  auto alone = train(cfg, base + "/alone" + mine, true, 20, ckpt);
  ASSERT_TRUE(alone);
  expect_same_parameters(*alone, *single, ep_rank, 1e-9);
}

TEST(ModelParallel, DataParallel2TrainsLikeOneProcess) { expect_same_training({2, 1, 1}); }
TEST(ModelParallel, ExpertParallel2TrainsLikeOneProcess) { expect_same_training({1, 2, 1}); }
TEST(ModelParallel, SequenceParallel2TrainsLikeOneProcess) { expect_same_training({1, 1, 2}); }
TEST(ModelParallel, SequenceParallel4TrainsLikeOneProcess) { expect_same_training({1, 1, 4}); }
TEST(ModelParallel, DataTimesExpertParallel2x2TrainsLikeOneProcess) {
  expect_same_training({2, 2, 1});
}
TEST(ModelParallel, Zero1DataParallel2TrainsLikeOneProcessAndResumes) {
  expect_same_training({2, 1, 1}, true);
}
// ep = world: each expert's replica group is one rank (no reduce-scatter, no gather for its
// buckets).
TEST(ModelParallel, Zero1ExpertParallel2TrainsLikeOneProcessAndResumes) {
  expect_same_training({1, 2, 1}, true);
}
TEST(ModelParallel, Zero1DataTimesExpertParallel2x2TrainsLikeOneProcessAndResumes) {
  expect_same_training({2, 2, 1}, true);
}
TEST(ModelParallel, Zero1DataTimesSequenceParallel2x2TrainsLikeOneProcessAndResumes) {
  expect_same_training({2, 1, 2}, true);
}

}  // namespace
}  // namespace hydra
