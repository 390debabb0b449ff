// CUDA tensors and the caching allocator. Skipped (reported as such by ctest) without a GPU.
#include <gtest/gtest.h>

#include "autograd/cuda_context.h"
#include "autograd/ops.h"
#include "tests/test_util.h"

namespace hydra {
namespace {

using testing::bitwise_equal;
using testing::randn32;

#define HYDRA_REQUIRE_GPU() \
  if (!cuda_available())    \
  GTEST_SKIP() << "no CUDA device (or a build without HYDRA_CUDA): GPU test skipped"

TEST(CudaTensor, RoundTripIsExact) {
  HYDRA_REQUIRE_GPU();
  for (const Shape& s : {Shape{7, 13, 5}, Shape{1}, Shape{1025}}) {
    Tensor x = randn32(s, 1);
    Tensor d = x.to(Device::cuda(0));
    EXPECT_TRUE(d.device().is_cuda());
    EXPECT_TRUE(bitwise_equal(d.cpu(), x));
  }
}

TEST(CudaTensor, RandomMatchesTheCpuStream) {
  HYDRA_REQUIRE_GPU();
  Generator gc(9), gg(9);
  const Tensor cpu = randn({4099}, gc, 0, 1, DType::kF32);
  const Tensor gpu = randn({4099}, gg, 0, 1, DType::kF32, Device::cuda(0));
  EXPECT_LT(testing::max_abs_diff(gpu, cpu), 1e-5);
  Generator uc(10), ug(10);
  EXPECT_TRUE(bitwise_equal(randint(0, 1000, {777}, uc),
                            randint(0, 1000, {777}, ug, DType::kI64, Device::cuda(0))));
}

TEST(CudaTensor, StridedCopyAndConversionMatchCpu) {
  HYDRA_REQUIRE_GPU();
  Tensor x = randn32({7, 13, 5}, 2);
  Tensor d = x.to(Device::cuda(0));
  EXPECT_TRUE(bitwise_equal(d.permute({2, 0, 1}).contiguous(), x.permute({2, 0, 1}).contiguous()));
  EXPECT_TRUE(bitwise_equal(d.to(DType::kBF16), x.to(DType::kBF16)));
  EXPECT_TRUE(bitwise_equal(d.slice(1, 2, 11, 3).contiguous(), x.slice(1, 2, 11, 3).contiguous()));
  Tensor f = zeros({3, 3}, DType::kF32, Device::cuda(0));
  f.fill_(2.5);
  EXPECT_EQ(f.cpu().to_vector<float>(), std::vector<float>(9, 2.5f));
}

TEST(CudaAllocator, ReusesFreedBlocksWithoutCallingTheDriver) {
  HYDRA_REQUIRE_GPU();
  { Tensor warm = empty({1 << 20}, DType::kF32, Device::cuda(0)); }
  const CudaMemoryStats before = cuda_memory_stats(0);
  for (int i = 0; i < 10; ++i) {
    Tensor t = empty({1 << 20}, DType::kF32, Device::cuda(0));
  }
  const CudaMemoryStats after = cuda_memory_stats(0);
  EXPECT_EQ(after.num_driver_allocations, before.num_driver_allocations);
  EXPECT_EQ(after.allocated, before.allocated);
  EXPECT_GE(after.peak_allocated, std::size_t{4} << 20);
}

TEST(CudaAllocator, StreamRecordedBlocksWaitForThatStream) {
  HYDRA_REQUIRE_GPU();
  void* comm = cuda_comm_stream(0);
  const CudaMemoryStats before = cuda_memory_stats(0);
  {
    Tensor t = empty({3 << 18}, DType::kF32, Device::cuda(0));
    cuda_record_stream(t.raw_data(), 0, comm);
  }
  Tensor u = empty({3 << 18}, DType::kF32, Device::cuda(0));
  (void)u;
  // The block may only be reused once the comm stream's work is done; either way nothing leaks.
  EXPECT_GE(cuda_memory_stats(0).reserved, before.reserved);
}

TEST(CudaAllocator, OutOfMemoryReportsStatistics) {
  HYDRA_REQUIRE_GPU();
  try {
    Tensor huge = empty({int64_t{1} << 48}, DType::kF32, Device::cuda(0));
    FAIL() << "allocated 1 PiB";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("out of memory"), std::string::npos) << msg;
    EXPECT_NE(msg.find("peak allocated"), std::string::npos) << msg;
  }
}

}  // namespace
}  // namespace hydra
