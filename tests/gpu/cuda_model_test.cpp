// The whole model on the GPU: f32 against the CPU reference, and BF16_MIXED (bf16 compute copies of
// the fp32 parameters) against f32, on the shipped tiny config with every path on.
#include <gtest/gtest.h>

#include <cmath>
#include <iostream>
#include <memory>
#include <string>

#include "autograd/compute_copies.h"
#include "autograd/cuda_context.h"
#include "autograd/grad_mode.h"
#include "tests/model/model_util.h"
#include "tests/test_util.h"

namespace hydra {
namespace {

#define HYDRA_REQUIRE_GPU() \
  if (!cuda_available())    \
  GTEST_SKIP() << "no CUDA device (or a build without HYDRA_CUDA): GPU test skipped"

struct Pass {
  double loss = 0;
  std::vector<double> grad;  // every parameter's gradient, flattened in order
};

Pass forward_backward(model::LanguageModel& m, const Tensor& tokens, const Tensor& targets,
                      ComputeCopies* copies) {
  m.zero_grad();
  Pass r;
  {
    const ComputeCopies::Scope scope(copies);
    model::ForwardContext ctx;
    const model::LmOutput out = m.forward(tokens, targets, ctx);
    EXPECT_EQ(out.loss.dtype(), DType::kF32) << "the loss is fp32";
    out.loss.backward();
    r.loss = out.loss.item<double>();
  }
  for (const auto& p : m.named_parameters()) {
    const Tensor g = p.tensor.sparse_grad() ? densify_sparse_grad(p.tensor) : p.tensor.grad();
    EXPECT_TRUE(g.defined()) << p.name;
    if (!g.defined()) continue;
    EXPECT_EQ(g.dtype(), DType::kF32) << p.name << ": gradients accumulate in fp32";
    const std::vector<double> v = g.cpu().to_vector<double>();
    r.grad.insert(r.grad.end(), v.begin(), v.end());
  }
  return r;
}

double rel(const std::vector<double>& a, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    num += (a[i] - ref[i]) * (a[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(num / den);
}

class CudaModelWrite : public ::testing::TestWithParam<bool> {};
INSTANTIATE_TEST_SUITE_P(CudaModel, CudaModelWrite, ::testing::Values(false, true),
                         [](const auto& info) {
                           return info.param ? "ParallelWorkspaceWrite" : "SerialWorkspaceWrite";
                         });

// A model on the GPU against the CPU reference, one batch of `batch` x `len` random tokens: in f32
// (loss 1e-5, gradients 1e-4 relative) and under BF16_MIXED (1e-2, 5e-2). Prints the errors under
// `label`; returns the three passes (and the GPU model through `gpu_out`) for the caller's checks.
struct CpuGpuPasses {
  Pass ref, f32, mixed;
};
CpuGpuPasses expect_gpu_matches_cpu(const model::ModelSpec& spec, uint64_t seed, int64_t batch,
                                    int64_t len, const std::string& label,
                                    std::unique_ptr<model::LanguageModel>* gpu_out = nullptr) {
  auto cpu = model::build_model(spec, seed), gpu = model::build_model(spec, seed);
  gpu->to(Device::cuda(0));
  const Tensor tokens = testing::random_tokens(spec.vocab, batch, len, seed + 1);
  const Tensor targets = testing::random_tokens(spec.vocab, batch, len, seed + 2);
  CpuGpuPasses r;
  r.ref = forward_backward(*cpu, tokens, targets, nullptr);
  r.f32 = forward_backward(*gpu, tokens.to(Device::cuda(0)), targets.to(Device::cuda(0)), nullptr);
  EXPECT_EQ(r.f32.grad.size(), r.ref.grad.size());
  EXPECT_NEAR(r.f32.loss, r.ref.loss, 1e-5 * r.ref.loss);
  if (r.f32.grad.size() == r.ref.grad.size()) {
    EXPECT_LT(rel(r.f32.grad, r.ref.grad), 1e-4);
  }
  ComputeCopies copies(*gpu, DType::kBF16);
  r.mixed =
      forward_backward(*gpu, tokens.to(Device::cuda(0)), targets.to(Device::cuda(0)), &copies);
  EXPECT_EQ(r.mixed.grad.size(), r.ref.grad.size());
  EXPECT_NEAR(r.mixed.loss, r.ref.loss, 1e-2 * r.ref.loss);
  if (r.mixed.grad.size() == r.ref.grad.size()) {
    EXPECT_LT(rel(r.mixed.grad, r.ref.grad), 5e-2);
    std::cout << label << ", batch " << batch << " x " << len << ": loss cpu " << r.ref.loss
              << ", cuda f32 " << r.f32.loss << ", bf16 mixed " << r.mixed.loss
              << "; gradient relative error f32 " << rel(r.f32.grad, r.ref.grad) << ", bf16 mixed "
              << rel(r.mixed.grad, r.ref.grad) << "\n";
  }
  if (gpu_out != nullptr) *gpu_out = std::move(gpu);
  return r;
}

TEST_P(CudaModelWrite, TinyModelMatchesCpuInF32AndBf16MixedFollowsF32) {
  HYDRA_REQUIRE_GPU();
  model::ModelSpec spec = testing::shipped_spec("tiny");
  spec.ws_parallel_write = GetParam();  // workspace.write: PARALLEL (gated_scan) or SERIAL
  std::unique_ptr<model::LanguageModel> gpu;
  // 224 tokens: not a multiple of the scan chunk (64)
  const CpuGpuPasses r = expect_gpu_matches_cpu(spec, 21, 3, 224, "tiny model", &gpu);
  ASSERT_EQ(r.mixed.grad.size(), r.ref.grad.size());
  EXPECT_GT(rel(r.mixed.grad, r.ref.grad), 1e-4) << "the pass computed in bf16";
  for (const Tensor& p : gpu->parameters())
    EXPECT_EQ(p.dtype(), DType::kF32) << "the masters stay fp32";
}

// The SSD form (ssm.form: SSD) through the whole tiny model: its fused kernels (tensor cores; in
// f32 three TF32 products a sum, in bf16 one) against the CPU reference, as the default form.
TEST(CudaModel, TinyModelInTheSsdFormMatchesCpu) {
  HYDRA_REQUIRE_GPU();
  model::ModelSpec spec = testing::shipped_spec("tiny");
  spec.ssd = true;
  spec.ssm_heads = spec.d_inner / 32;                                      // heads of 32 channels
  (void)expect_gpu_matches_cpu(spec, 31, 2, 224, "tiny model, SSD form");  // a partial last chunk
}

// The opt-in kernel forms give the model the loss and gradients of the default ones: the scan's
// forward in one pass (HYDRA_SCAN_FWD=lanes) on the tiny model in f32 (the same sums in another
// order: relative 1e-4), and cuDNN's fused attention (HYDRA_ATTENTION=cudnn) in a small
// Transformer under BF16_MIXED against our kernels under BF16_MIXED (two bf16 computations: 2e-2).
// Each form's call count shows that it ran.
TEST(CudaModel, OptInKernelFormsGiveTheSameLossAndGradients) {
  HYDRA_REQUIRE_GPU();
  {
    model::ModelSpec spec = testing::shipped_spec("tiny");
    spec.max_seq_len = 320;  // past the lanes form's segment of 256 steps; a multiple of moe.chunk
    auto m = model::build_model(spec, 41);
    m->to(Device::cuda(0));
    const Tensor tokens = testing::random_tokens(spec.vocab, 2, 320, 42).to(Device::cuda(0));
    const Tensor targets = testing::random_tokens(spec.vocab, 2, 320, 43).to(Device::cuda(0));
    Pass chunked, lanes;
    {
      const testing::ScopedEnv env("HYDRA_SCAN_FWD", "chunked");
      chunked = forward_backward(*m, tokens, targets, nullptr);
    }
    const int64_t before = testing::scan_lanes_calls();
    {
      const testing::ScopedEnv env("HYDRA_SCAN_FWD", "lanes");
      lanes = forward_backward(*m, tokens, targets, nullptr);
    }
    EXPECT_GT(testing::scan_lanes_calls(), before) << "the lanes form ran";
    ASSERT_EQ(lanes.grad.size(), chunked.grad.size());
    EXPECT_NEAR(lanes.loss, chunked.loss, 1e-5 * chunked.loss);
    EXPECT_LT(rel(lanes.grad, chunked.grad), 1e-4);
  }
  if (!testing::cudnn_attention_available()) return;  // cuDNN older than 9.10.2
  const model::ModelSpec spec = testing::spec_from(
      "kind: TRANSFORMER vocab_size: 256 d_model: 128 num_blocks: 2 max_seq_len: 256 "
      "transformer { num_heads: 2 d_ff: 256 }");
  auto m = model::build_model(spec, 44);
  m->to(Device::cuda(0));
  ComputeCopies copies(*m, DType::kBF16);
  const Tensor tokens = testing::random_tokens(spec.vocab, 2, 256, 45).to(Device::cuda(0));
  const Tensor targets = testing::random_tokens(spec.vocab, 2, 256, 46).to(Device::cuda(0));
  Pass ours, cudnn;
  {
    const testing::ScopedEnv env("HYDRA_ATTENTION", "ours");
    ours = forward_backward(*m, tokens, targets, &copies);
  }
  const int64_t before = testing::cudnn_attention_calls();
  {
    const testing::ScopedEnv env("HYDRA_ATTENTION", "cudnn");
    cudnn = forward_backward(*m, tokens, targets, &copies);
  }
  EXPECT_EQ(testing::cudnn_attention_calls() - before, 2 * 2)
      << "cuDNN ran both layers' forward and backward";
  ASSERT_EQ(cudnn.grad.size(), ours.grad.size());
  EXPECT_NEAR(cudnn.loss, ours.loss, 1e-2 * ours.loss);
  EXPECT_LT(rel(cudnn.grad, ours.grad), 2e-2);
}

// Recurrent decoding on the GPU gives the full forward's logits: the prompt in one segment, then
// one token at a time and short segments, for both workspace writes and the Transformer, in f32
// (relative 1e-4: the same sums in another order) and under BF16_MIXED (against f32's logits: the
// bf16 rounding of a forward, 3e-2).
TEST_P(CudaModelWrite, DecodingEqualsTheFullForward) {
  HYDRA_REQUIRE_GPU();
  for (const bool transformer : {false, true}) {
    SCOPED_TRACE(transformer ? "transformer" : "hydra");
    model::ModelSpec spec = transformer ? testing::spec_from(
                                              "kind: TRANSFORMER vocab_size: 256 d_model: 64 "
                                              "num_blocks: 2 max_seq_len: 256")
                                        : testing::shipped_spec("tiny");
    spec.ws_parallel_write = GetParam();
    auto m = model::build_model(spec, 31);
    m->to(Device::cuda(0));
    const int64_t B = 2, L = 160;
    const Tensor tokens = testing::random_tokens(spec.vocab, B, L, 32).to(Device::cuda(0));
    ComputeCopies copies(*m, DType::kBF16);
    NoGradGuard ng;
    std::vector<double> f32;
    for (ComputeCopies* c : {static_cast<ComputeCopies*>(nullptr), &copies}) {
      const ComputeCopies::Scope scope(c);
      model::ForwardContext ctx;
      ctx.collect_stats = false;
      const std::vector<double> full =
          m->forward(tokens, Tensor(), ctx, true).logits.to(DType::kF32).to_vector<double>();
      if (c == nullptr) f32 = full;
      model::DecodeState state(B, spec.max_seq_len);
      state.kv_split = 32;      // the Transformer's one-token steps attend in merged parts
      std::vector<double> got;  // [B, L, V] in order
      std::vector<std::vector<double>> per_seq(B);
      const int64_t V = spec.vocab;
      for (const int64_t n : {77, 1, 1, 1, 9, 1, 3, 1, 1, 65}) {
        const std::vector<double> seg = m->decode(tokens.narrow(1, state.position, n), {}, state)
                                            .to(DType::kF32)
                                            .to_vector<double>();
        for (int64_t b = 0; b < B; ++b)
          per_seq[b].insert(per_seq[b].end(), seg.begin() + b * n * V,
                            seg.begin() + (b + 1) * n * V);
      }
      ASSERT_EQ(state.position, L);
      for (const auto& v : per_seq) got.insert(got.end(), v.begin(), v.end());
      ASSERT_EQ(got.size(), full.size());
      const double tolerance = c == nullptr ? 1e-4 : 3e-2;
      EXPECT_LT(rel(got, c == nullptr ? full : f32), tolerance)
          << (c == nullptr ? "f32" : "bf16 mixed");
      std::cout << (transformer ? "transformer" : "tiny") << (c ? " bf16 mixed" : " f32")
                << ": decoding vs the full forward, relative difference of the logits "
                << rel(got, full) << "\n";
    }
  }
}

}  // namespace
}  // namespace hydra
