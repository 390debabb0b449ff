// CUDA tensors and the caching allocator. Skipped (reported as such by ctest) without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <thread>

#include "autograd/cuda_context.h"
#include "autograd/ops.h"
#if HYDRA_WITH_CUDA
#include "kernels/device_runtime.h"
#include "kernels/device_trace.h"
#endif
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
  // Rows longer than the row kernel's 16384 elements, split into pieces: [3, 5, 24576] -> [5, 3,
  // 24576] (bf16, vectors; f32 -> bf16, elements), and a length with no piece (24583, prime).
  for (const int64_t len : {int64_t{24576}, int64_t{24583}}) {
    const Tensor big = randn32({3, 5, len}, 3);
    const Tensor bigb = big.to(DType::kBF16), gb = bigb.to(Device::cuda(0));
    EXPECT_TRUE(
        bitwise_equal(gb.permute({1, 0, 2}).contiguous(), bigb.permute({1, 0, 2}).contiguous()))
        << len;
    EXPECT_TRUE(bitwise_equal(big.to(Device::cuda(0)).permute({1, 0, 2}).to(DType::kBF16),
                              bigb.permute({1, 0, 2}).contiguous()))
        << len;
  }
  // Few long rows are copied in pieces (more warps than rows): slices at aligned and unaligned
  // offsets, a length with no piece (2050), dtype conversions.
  for (const int64_t len : {int64_t{2048}, int64_t{2050}, int64_t{16384}})
    for (const int64_t offset : {int64_t{0}, int64_t{8}, int64_t{3}}) {
      const Tensor src = randn32({6, len + 11}, 4 + len + offset);
      const Tensor want = src.narrow(1, offset, len).contiguous();
      const Tensor gsrc = src.to(Device::cuda(0));
      EXPECT_TRUE(bitwise_equal(gsrc.narrow(1, offset, len).contiguous(), want))
          << len << " " << offset;
      EXPECT_TRUE(
          bitwise_equal(gsrc.narrow(1, offset, len).to(DType::kBF16), want.to(DType::kBF16)))
          << len << " " << offset;
    }
  Tensor f = zeros({3, 3}, DType::kF32, Device::cuda(0));
  f.fill_(2.5);
  EXPECT_EQ(f.cpu().to_vector<float>(), std::vector<float>(9, 2.5f));
  // fill_ in 16-byte packs from an aligned start, element by element otherwise and past the last
  // whole pack: every element of the view is written, none beside it.
  for (const DType t : {DType::kF32, DType::kBF16, DType::kI64})
    for (const int64_t n : {1, 7, 8, 9, 1000, 4099})
      for (const int64_t offset : {0, 3}) {
        Tensor whole = zeros({n + offset + 5}, t, Device::cuda(0));
        whole.narrow(0, offset, n).fill_(2.0);
        const std::vector<double> got = whole.to(DType::kF64).cpu().to_vector<double>();
        for (int64_t i = 0; i < n + offset + 5; ++i)
          ASSERT_EQ(got[i], i >= offset && i < offset + n ? 2.0 : 0.0)
              << dtype_name(t) << " n " << n << " offset " << offset << " element " << i;
      }
}

// The one-launch copy of many tensors (mixed precision's parameter casts) equals copy_ on the CPU,
// f32 -> bf16 and bf16 -> f32, at sizes around its 8192-element blocks.
TEST(CudaTensor, CopyManyMatchesCpu) {
  HYDRA_REQUIRE_GPU();
  for (DType to : {DType::kBF16, DType::kF32}) {
    std::vector<Tensor> src, dst, want;
    for (int64_t n : {1, 7, 8191, 8192, 8193, 40000, 3}) {
      const Tensor s = randn32({n}, 200 + n);
      const Tensor sd = to == DType::kF32 ? s.to(DType::kBF16) : s;
      src.push_back(sd.to(Device::cuda(0)));
      dst.push_back(zeros({n}, to, Device::cuda(0)));
      want.push_back(sd.to(to));
    }
    copy_many_(dst, src);
    for (std::size_t i = 0; i < dst.size(); ++i)
      EXPECT_TRUE(bitwise_equal(dst[i].cpu(), want[i])) << i << " " << dtype_name(to);
  }
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

#if HYDRA_WITH_CUDA  // these drive the runtime directly
TEST(CudaAllocator, StreamRecordedBlocksWaitForThatStream) {
  HYDRA_REQUIRE_GPU();
  void* comm = cuda_comm_stream(0);
  Tensor busy = empty({int64_t{1} << 30}, DType::kF32, Device::cuda(0));  // 4 GiB
  void* first = nullptr;
  {
    Tensor t = empty({3 << 18}, DType::kF32, Device::cuda(0));
    first = t.raw_data();
    // Milliseconds of work on the comm stream, then t is marked as used there and freed.
    kernels::cuda::memset_async(busy.raw_data(), 0, busy.nbytes(), comm);
    cuda_record_stream(t.raw_data(), 0, comm);
  }
  {
    Tensor u = empty({3 << 18}, DType::kF32, Device::cuda(0));
    EXPECT_NE(u.raw_data(), first)
        << "a block still in use on the comm stream was handed out again";
  }
  kernels::cuda::stream_synchronize(comm);
  Tensor w = empty({3 << 18}, DType::kF32, Device::cuda(0));
  // Once the comm stream is done, the block is back in the cache (the most recent free of this size
  // is u's block, so either is acceptable, but no new driver allocation may happen).
  const int64_t drivers = cuda_memory_stats(0).num_driver_allocations;
  Tensor x = empty({3 << 18}, DType::kF32, Device::cuda(0));
  EXPECT_EQ(cuda_memory_stats(0).num_driver_allocations, drivers);
}

TEST(CudaPinned, AsyncCopiesFromPinnedMemoryAreCorrectAndProtectTheBlock) {
  HYDRA_REQUIRE_GPU();
  const Tensor src =
      testing::randn32({int64_t{64} << 20}, 5);  // 256 MiB: the copy takes milliseconds
  Tensor dev;
  void* first = nullptr;
  {
    Tensor pinned = src.pin_memory();
    ASSERT_TRUE(pinned.is_pinned());
    EXPECT_FALSE(src.is_pinned());
    first = pinned.raw_data();
    dev = pinned.to(Device::cuda(0));  // returns at once; the host tensor dies right after
  }
  {
    Tensor again = empty_like(src).pin_memory();  // same size class, while the copy may still run
    EXPECT_NE(again.raw_data(), first) << "a pinned block was reused while a copy still read it";
  }
  EXPECT_TRUE(testing::bitwise_equal(dev.cpu(), src));
  EXPECT_GE(cuda_pinned_memory_stats().reserved, src.nbytes());
}

TEST(CudaEvent, OrdersWorkAcrossStreams) {
  HYDRA_REQUIRE_GPU();
  void* compute = cuda_compute_stream(0);
  void* comm = cuda_comm_stream(0);
  Tensor a = empty({int64_t{1} << 28}, DType::kF32, Device::cuda(0));  // 1 GiB
  Tensor b = empty({int64_t{1} << 28}, DType::kF32, Device::cuda(0));
  CudaEvent start, end;
  start.record(compute);
  a.fill_(3.0);  // on the compute stream
  cuda_stream_wait(comm, compute);
  kernels::cuda::memcpy_async(b.raw_data(), a.raw_data(), a.nbytes(),
                              kernels::cuda::CopyKind::kDeviceToDevice, comm);
  cuda_record_stream(a.raw_data(), 0, comm);
  end.record(comm);
  end.synchronize();
  EXPECT_TRUE(end.done());
  EXPECT_GT(end.ms_since(start), 0.0f);
  const auto v = b.narrow(0, (int64_t{1} << 28) - 5, 5).cpu().to_vector<float>();
  for (float x : v) EXPECT_EQ(x, 3.0f);
}

// HYDRA_TRACE's recording (kernels/device_trace.h): the kernels and copies between two marks, on
// the device's clock, and the time the device waited for the host between them.
TEST(DeviceTrace, RecordsTheKernelsAndCopiesBetweenMarks) {
  HYDRA_REQUIRE_GPU();
  std::string why;
  ASSERT_TRUE(kernels::device_trace_start("", &why)) << why;
  const Tensor a = randn32({512, 384}, 3).to(Device::cuda(0));
  kernels::cuda::device_synchronize(0);
  kernels::device_trace_mark("start");
  Tensor c = matmul(a, a.transpose(0, 1));  // a GEMM
  c = add(c, c);                            // an element-wise kernel
  kernels::cuda::device_synchronize(0);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));  // the device idles
  const Tensor back = c.cpu();                                 // a copy to the host
  kernels::cuda::device_synchronize(0);
  kernels::device_trace_mark("end");
  const kernels::TraceSummary s = kernels::device_trace_stop();
  EXPECT_FALSE(kernels::device_trace_active());
  EXPECT_EQ(s.steps, 1);
  EXPECT_GE(s.activities, 3.0);
  EXPECT_GT(s.busy_ms, 0.0);
  EXPECT_GE(s.wall_ms, 20.0);
  EXPECT_GE(s.idle_ms[3], 19.0) << "the 20 ms sleep is a gap of the device";
  bool copy = false;
  for (const auto& k : s.kernels) copy = copy || k.name == "memcpy DtoH";
  EXPECT_TRUE(copy);
}

// A mark queued on a stream takes the moment the device reaches it, not the host's: a GEMM of
// about 20 ms queued before the first mark lies outside the marks' window (the trainer queues a
// step before the one before it has run: its mark must not split that one).
TEST(DeviceTrace, MarksQueuedOnAStreamTakeTheDevicesTime) {
  HYDRA_REQUIRE_GPU();
  const Tensor a = randn32({8192, 8192}, 5).to(Device::cuda(0));
  kernels::cuda::device_synchronize(0);
  std::string why;
  ASSERT_TRUE(kernels::device_trace_start("", &why)) << why;
  void* stream = current_stream(Device::cuda(0));
  const Tensor big = matmul(a, a);  // 1.1 TFLOP in fp32: about 20 ms
  kernels::device_trace_mark("start", stream);
  const Tensor small = add(a, a);
  kernels::cuda::device_synchronize(0);
  kernels::device_trace_mark("end", stream);
  const kernels::TraceSummary s = kernels::device_trace_stop();
  EXPECT_EQ(s.steps, 1);
  EXPECT_LT(s.wall_ms, 5.0) << "the window began at the host's mark, before the GEMM ran";
  double longest = 0;
  for (const auto& k : s.kernels) longest = std::max(longest, k.ms);
  EXPECT_LT(longest, 2.0) << "the GEMM queued before the first mark is inside the window";
  EXPECT_GT(s.busy_ms, 0.0) << "the add between the marks is missing";
}

#endif

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
