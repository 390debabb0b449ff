// The whole model on the GPU: f32 against the CPU reference, and BF16_MIXED (bf16 compute copies of
// the fp32 parameters) against f32, on the shipped tiny config with every path on.
#include <gtest/gtest.h>

#include <cmath>

#include "autograd/compute_copies.h"
#include "autograd/cuda_context.h"
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

TEST_P(CudaModelWrite, TinyModelMatchesCpuInF32AndBf16MixedFollowsF32) {
  HYDRA_REQUIRE_GPU();
  model::ModelSpec spec = testing::shipped_spec("tiny");
  spec.ws_parallel_write = GetParam();  // workspace.write: PARALLEL (gated_scan) or SERIAL
  auto cpu = model::build_model(spec, 21), gpu = model::build_model(spec, 21);
  gpu->to(Device::cuda(0));
  const Tensor tokens =
      testing::random_tokens(spec.vocab, 3, 224, 22);  // not a multiple of the scan chunk (64)
  const Tensor targets = testing::random_tokens(spec.vocab, 3, 224, 23);
  const Pass ref = forward_backward(*cpu, tokens, targets, nullptr);
  const Pass f32 =
      forward_backward(*gpu, tokens.to(Device::cuda(0)), targets.to(Device::cuda(0)), nullptr);
  ASSERT_EQ(f32.grad.size(), ref.grad.size());
  EXPECT_NEAR(f32.loss, ref.loss, 1e-5 * ref.loss);
  EXPECT_LT(rel(f32.grad, ref.grad), 1e-4);

  ComputeCopies copies(*gpu, DType::kBF16);
  const Pass mixed =
      forward_backward(*gpu, tokens.to(Device::cuda(0)), targets.to(Device::cuda(0)), &copies);
  ASSERT_EQ(mixed.grad.size(), ref.grad.size());
  EXPECT_NEAR(mixed.loss, ref.loss, 1e-2 * ref.loss);
  EXPECT_LT(rel(mixed.grad, ref.grad), 5e-2);
  EXPECT_GT(rel(mixed.grad, ref.grad), 1e-4) << "the pass computed in bf16";
  for (const Tensor& p : gpu->parameters())
    EXPECT_EQ(p.dtype(), DType::kF32) << "the masters stay fp32";
  std::cout << "tiny model, batch 3 x 224: loss cpu " << ref.loss << ", cuda f32 " << f32.loss
            << ", bf16 mixed " << mixed.loss << "; gradient relative error f32 "
            << rel(f32.grad, ref.grad) << ", bf16 mixed " << rel(mixed.grad, ref.grad) << "\n";
}

}  // namespace
}  // namespace hydra
