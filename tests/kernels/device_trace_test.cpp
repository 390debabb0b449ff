// The device trace's summary, names and Chrome trace on made-up records (the recording itself needs
// a GPU: tests/gpu).
#include "kernels/device_trace.h"

#include <gtest/gtest.h>

#include <sstream>

namespace hydra::kernels {
namespace {

TEST(DeviceTrace, SummaryCountsBusyTimeGapsAndKernelsPerStep) {
  // Two steps of 100 us (marks at 0, 100, 200 us); times in ns.
  const std::vector<TraceMark> marks = {{1000000, "step 2"}, {1100000, "step 3"}, {1200000, "end"}};
  std::vector<TraceRecord> r = {
      {999000, 1010000, 7, "a"},   // starts before the first mark: clipped to 10 us
      {1010000, 1040000, 7, "b"},  // back to back: 30 us
      {1020000, 1030000, 9, "c"},  // inside b on another stream: adds no busy time
      {1043000, 1050000, 7, "a"},  // after a 3 us gap: 7 us
      {1080000, 1180000, 7, "d"},  // after a 30 us gap: 100 us
      {1190000, 1250000, 7, "b"},  // after a 10 us gap, clipped at the last mark: 10 us
      {1300000, 1400000, 7, "z"},  // after the last mark: left out
  };
  const TraceSummary s = summarize_trace(r, marks, 3);
  EXPECT_EQ(s.steps, 2);
  EXPECT_DOUBLE_EQ(s.wall_ms, 0.1);
  EXPECT_NEAR(s.busy_ms, (10 + 30 + 7 + 100 + 10) * 1e-3 / 2, 1e-12);
  EXPECT_DOUBLE_EQ(s.activities, 3.0);
  EXPECT_NEAR(s.idle_ms[0], 3e-3 / 2, 1e-12);
  EXPECT_NEAR(s.idle_ms[1], 10e-3 / 2, 1e-12);
  EXPECT_NEAR(s.idle_ms[2], 30e-3 / 2, 1e-12);
  EXPECT_EQ(s.idle_ms[3], 0);
  EXPECT_NEAR(s.busy_ms + s.idle_ms[0] + s.idle_ms[1] + s.idle_ms[2], s.wall_ms, 1e-12);
  // Both steps last 100 us: the lower median is the first, busy 10 + 30 + 7 + 20 us of it.
  EXPECT_NEAR(s.median_step_ms, 0.1, 1e-12);
  EXPECT_NEAR(s.median_busy_ms, 0.067, 1e-12);
  ASSERT_EQ(s.largest.size(), 3u);
  EXPECT_DOUBLE_EQ(s.largest[0].us, 30);
  EXPECT_EQ(s.largest[0].before, "a");
  EXPECT_EQ(s.largest[0].after, "d");
  EXPECT_DOUBLE_EQ(s.largest[1].us, 10);
  EXPECT_EQ(s.largest[1].before, "d");
  ASSERT_EQ(s.kernels.size(), 3u);
  EXPECT_EQ(s.kernels[0].name, "d");
  EXPECT_NEAR(s.kernels[0].ms, 0.05, 1e-12);
  EXPECT_EQ(s.kernels[1].name, "b");
  EXPECT_NEAR(s.kernels[1].ms, 0.02, 1e-12);
  EXPECT_DOUBLE_EQ(s.kernels[1].count, 1.0);
  std::ostringstream os;
  print_trace_summary(os, s);
  EXPECT_NE(os.str().find("2 steps; a step 0.10 ms, the device busy 0.08 ms"), std::string::npos)
      << os.str();
}

TEST(DeviceTrace, TheMedianStepLeavesOutALongLastStep) {
  // Steps of 10, 12 and 50 us (the last reads statistics); 8, 9 and 5 us busy.
  const std::vector<TraceMark> marks = {{0, "s1"}, {10000, "s2"}, {22000, "s3"}, {72000, "end"}};
  const std::vector<TraceRecord> r = {
      {1000, 9000, 7, "a"}, {12000, 18000, 7, "b"}, {17000, 21000, 9, "c"}, {30000, 35000, 7, "a"}};
  const TraceSummary s = summarize_trace(r, marks);
  EXPECT_NEAR(s.wall_ms, 0.024, 1e-12);
  EXPECT_NEAR(s.median_step_ms, 0.012, 1e-12);
  EXPECT_NEAR(s.median_busy_ms, 0.009, 1e-12);
}

TEST(DeviceTrace, SummaryOfAnIdleWindowAndOfTooFewMarks) {
  const TraceSummary idle = summarize_trace({}, {{0, "a"}, {50000, "b"}});
  EXPECT_EQ(idle.steps, 1);
  EXPECT_EQ(idle.busy_ms, 0);
  EXPECT_NEAR(idle.idle_ms[2], 0.05, 1e-12);
  ASSERT_EQ(idle.largest.size(), 1u);
  EXPECT_EQ(idle.largest[0].before, "(the first mark)");
  EXPECT_EQ(idle.largest[0].after, "(the last mark)");
  EXPECT_EQ(summarize_trace({{0, 10, 0, "a"}}, {{0, "only"}}).steps, 0);
}

TEST(DeviceTrace, ShortNamesOfKernels) {
  // void hydra::kernels::cuda::(anonymous namespace)::scan_bwd_kernel<float, 16, true>(int)
  EXPECT_EQ(
      short_kernel_name("_ZN5hydra7kernels4cuda12_GLOBAL__N_115scan_bwd_kernelIfLi16ELb1EEEvi"),
      "scan_bwd_kernel<float, 16, true>");
  EXPECT_EQ(
      short_kernel_name("_ZN5hydra7kernels4cuda12_GLOBAL__N_115scan_bwd_kernelIfLi16ELb1EEEvi", 20),
      "scan_bwd_kernel<...>");
  EXPECT_EQ(short_kernel_name("sm90_xmma_gemm_bf16bf16_bf16f32"),
            "sm90_xmma_gemm_bf16bf16_bf16f32");
  EXPECT_EQ(short_kernel_name("memcpy HtoD"), "memcpy HtoD");
}

TEST(DeviceTrace, ChromeTraceHoldsEveryRecordAndMark) {
  std::ostringstream os;
  write_chrome_trace(os, {{2000, 5000, 7, "k\"1"}}, {{1000, "step 2"}, {9000, "end"}});
  const std::string t = os.str();
  EXPECT_NE(t.find("\"name\": \"k\\\"1\", \"ph\": \"X\", \"ts\": 1.000, \"dur\": 3.000"),
            std::string::npos)
      << t;
  EXPECT_NE(t.find("\"name\": \"end\", \"ph\": \"i\", \"s\": \"g\", \"ts\": 8.000"),
            std::string::npos)
      << t;
  EXPECT_EQ(t.substr(0, 16), "{\"displayTimeUni");
  EXPECT_EQ(t.substr(t.size() - 3), "]}\n");
}

TEST(DeviceTrace, EachRankWritesAFileOfItsOwn) {
  EXPECT_EQ(device_trace_file("out/trace.json", 0, 1), "out/trace.json");
  EXPECT_EQ(device_trace_file("out/trace.json", 0, 4), "out/trace.rank0.json");
  EXPECT_EQ(device_trace_file("out/trace.json", 3, 4), "out/trace.rank3.json");
  EXPECT_EQ(device_trace_file("out.d/trace", 1, 2), "out.d/trace.rank1");
  EXPECT_EQ(device_trace_file(".trace", 1, 2), ".trace.rank1");
  EXPECT_EQ(device_trace_file("", 1, 2), "");
}

TEST(DeviceTrace, RecordingNeedsACudaBuild) {
  if (HYDRA_WITH_CUDA) GTEST_SKIP() << "a CUDA build: tests/gpu records a trace";
  std::string why;
  EXPECT_FALSE(device_trace_start("", &why));
  EXPECT_NE(why.find("CUDA build"), std::string::npos);
  EXPECT_FALSE(device_trace_active());
}

}  // namespace
}  // namespace hydra::kernels
