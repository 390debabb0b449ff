// The communicators' collectives and the process grid, run under mpirun with 1, 2 and 4 ranks
// (ctest label mpi). Every collective test runs three times: over MPI on CPU tensors, over NCCL on
// CUDA tensors (skipped without one GPU per rank), and over MPI on CUDA tensors staged through host
// memory. Every check uses values that differ per rank, so a collective that moved the wrong data
// (or none) fails.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <thread>

#include "autograd/device.h"
#include "autograd/ops.h"
#include "parallel/grid.h"
#include "parallel/runtime.h"
#include "tests/test_util.h"

namespace hydra::parallel {
namespace {

std::unique_ptr<Communicator> world() { return world_communicator(false); }

// The three ways tensors travel: MPI over CPU tensors, NCCL over CUDA tensors (skipped without one
// GPU per rank), and MPI over CUDA tensors staged through host memory (skipped without a GPU).
enum class Path { kMpi, kNccl, kStaged };

class CommunicatorTest : public ::testing::TestWithParam<Path> {
 protected:
  void SetUp() override {
    if (GetParam() == Path::kMpi) return;
    if (!cuda_available())
      GTEST_SKIP() << "no CUDA device (or a build without HYDRA_CUDA): GPU test skipped";
    if (GetParam() == Path::kNccl && cuda_device_count() < process_info().local_size)
      GTEST_SKIP() << "NCCL needs one GPU per rank: " << process_info().local_size
                   << " ranks on this host, " << cuda_device_count() << " GPU(s)";
  }
  std::unique_ptr<Communicator> comm() const {
    return world_communicator(GetParam() != Path::kMpi,
                              GetParam() == Path::kStaged ? CommBackend::kMpi : CommBackend::kAuto);
  }
  // Tensors live on the communicator's device; results are read back on the host after the
  // communication stream has finished.
  static Tensor on(const Communicator& c, const Tensor& t) { return t.to(c.device()); }
  static Tensor back(Communicator& c, const Tensor& t) {
    c.synchronize();
    return t.cpu();
  }
};

INSTANTIATE_TEST_SUITE_P(Backends, CommunicatorTest,
                         ::testing::Values(Path::kMpi, Path::kNccl, Path::kStaged),
                         [](const ::testing::TestParamInfo<Path>& i) {
                           return i.param == Path::kMpi    ? "mpi"
                                  : i.param == Path::kNccl ? "nccl"
                                                           : "staged";
                         });

// More ranks on a host than GPUs: NCCL would refuse two ranks on one GPU; the error says what to
// do.
TEST(Runtime, NcclWithMoreRanksThanGpusSaysWhatToDo) {
  if (!cuda_available())
    GTEST_SKIP() << "no CUDA device (or a build without HYDRA_CUDA): GPU test skipped";
  if (cuda_device_count() >= process_info().local_size || !process_info().distributed)
    GTEST_SKIP() << "needs more ranks on this host than GPUs";
  try {
    world_communicator(true, CommBackend::kNccl);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("NCCL needs one GPU per rank"), std::string::npos)
        << e.what();
    EXPECT_NE(std::string(e.what()).find("parallel.comm = MPI"), std::string::npos) << e.what();
  }
}

// Values of rank r: r * 100 + i (+ 0.5 to catch integer truncation).
Tensor rank_values(int r, int64_t n) {
  std::vector<double> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = r * 100.0 + double(i) + 0.5;
  return tensor(v, {n});
}

TEST_P(CommunicatorTest, AllReduceSumMaxAndAsync) {
  auto w = comm();
  const int n = w->size(), r = w->rank();
  Tensor t = on(*w, rank_values(r, 7));
  w->all_reduce(t, ReduceOp::kSum);
  Tensor m = on(*w, rank_values(r, 7));
  w->all_reduce(m, ReduceOp::kMax);
  Tensor a = on(*w, rank_values(r, 100003).to(DType::kF32));
  auto work = w->all_reduce_async(a);
  work->wait();
  const auto tv = back(*w, t).to_vector<double>(), mv = back(*w, m).to_vector<double>();
  const auto av = back(*w, a).to_vector<float>();
  for (int64_t i = 0; i < 7; ++i) {
    double sum = 0;
    for (int q = 0; q < n; ++q) sum += q * 100.0 + double(i) + 0.5;
    EXPECT_DOUBLE_EQ(tv[i], sum);
    EXPECT_DOUBLE_EQ(mv[i], (n - 1) * 100.0 + double(i) + 0.5);
  }
  double sum0 = 0;
  for (int q = 0; q < n; ++q) sum0 += q * 100.0 + 100002.5;
  EXPECT_FLOAT_EQ(av[100002], float(sum0));
  EXPECT_DOUBLE_EQ(w->all_reduce_host(double(r + 1)), n * (n + 1) / 2.0);
  if (!w->on_gpu()) return;  // MPI on CPU tensors has no bf16 sum
  // bf16 (NCCL natively; staged: summed in f32 on the host): small integers, exact in bf16.
  std::vector<double> small(9);
  for (int64_t i = 0; i < 9; ++i) small[i] = double((r + 1) * (i % 4 + 1));
  Tensor b = on(*w, tensor(small, {9}).to(DType::kBF16));
  w->all_reduce(b, ReduceOp::kSum);
  const auto bv = back(*w, b).to_vector<double>();
  for (int64_t i = 0; i < 9; ++i) EXPECT_EQ(bv[i], n * (n + 1) / 2.0 * double(i % 4 + 1)) << i;
}

TEST_P(CommunicatorTest, AllGatherAndReduceScatterAreAdjoint) {
  auto w = comm();
  const int n = w->size(), r = w->rank();
  const Tensor mine = on(*w, rank_values(r, 5).reshape({1, 5}));
  Tensor all = on(*w, zeros({n, 5}, DType::kF64));
  w->all_gather(mine, all);
  const Tensor got = back(*w, all);
  for (int q = 0; q < n; ++q)
    EXPECT_TRUE(testing::bitwise_equal(got.narrow(0, q, 1).contiguous(),
                                       rank_values(q, 5).reshape({1, 5})));
  // In place: each rank's input is its own slice of the output (ZeRO-1 gathers parameters this
  // way).
  Tensor flat = on(*w, full({n * 5}, std::nan(""), DType::kF64));
  flat.narrow(0, r * 5, 5).copy_(on(*w, rank_values(r, 5)));
  w->all_gather(flat.narrow(0, r * 5, 5), flat);
  const Tensor gathered = back(*w, flat);
  for (int q = 0; q < n; ++q)
    EXPECT_TRUE(
        testing::bitwise_equal(gathered.narrow(0, q * 5, 5).contiguous(), rank_values(q, 5)))
        << q;
  // reduce_scatter of [n, 3] where rank r holds r + 1 everywhere: each slice sums to n(n+1)/2.
  Tensor in = on(*w, full({n, 3}, double(r + 1), DType::kF64));
  Tensor out = on(*w, zeros({1, 3}, DType::kF64));
  w->reduce_scatter(in, out);
  for (double v : back(*w, out).to_vector<double>()) EXPECT_DOUBLE_EQ(v, n * (n + 1) / 2.0);
  // The asynchronous form (ZeRO-1 buckets): rank r's slice q of 1001 floats is q * 1000 + r + i, so
  // slice q sums to n (q * 1000 + i) + n (n - 1) / 2.
  const int64_t m = 1001;
  std::vector<float> vals(n * m);
  for (int q = 0; q < n; ++q)
    for (int64_t i = 0; i < m; ++i) vals[q * m + i] = float(q * 1000 + r + i);
  Tensor ain = on(*w, tensor(vals, {n * m}));
  Tensor aout = on(*w, full({m}, std::nan(""), DType::kF32));
  auto work = w->reduce_scatter_async(ain, aout);
  work->wait();
  const auto av = back(*w, aout).to_vector<float>();
  for (int64_t i = 0; i < m; ++i)
    EXPECT_EQ(av[i], float(n * (r * 1000 + i) + n * (n - 1) / 2)) << i;
}

TEST_P(CommunicatorTest, BroadcastFromEveryRoot) {
  auto w = comm();
  for (int root = 0; root < w->size(); ++root) {
    Tensor t = on(*w, rank_values(w->rank(), 4));
    w->broadcast(t, root);
    EXPECT_TRUE(testing::bitwise_equal(back(*w, t), rank_values(root, 4)));
  }
}

TEST_P(CommunicatorTest, AllToAllVWithUnevenAndEmptyCounts) {
  auto w = comm();
  const int n = w->size(), r = w->rank();
  // Rank r sends (r + p) % 3 rows of width 2 to peer p, row values encode (sender, receiver,
  // index).
  std::vector<int64_t> sc(n), rc(n);
  std::vector<double> send;
  for (int p = 0; p < n; ++p) {
    sc[p] = (r + p) % 3;
    rc[p] = (p + r) % 3;
    for (int64_t i = 0; i < sc[p]; ++i) {
      send.push_back(r * 1000 + p * 10 + i);
      send.push_back(-(r * 1000 + p * 10 + i));
    }
  }
  int64_t total_s = 0, total_r = 0;
  for (int p = 0; p < n; ++p) {
    total_s += sc[p];
    total_r += rc[p];
  }
  Tensor s = on(*w, tensor(send, {total_s, 2}));
  Tensor got = on(*w, full({total_r, 2}, -7.0, DType::kF64));
  w->all_to_all_v(s, sc, got, rc);
  const auto g = back(*w, got).to_vector<double>();
  int64_t row = 0;
  for (int p = 0; p < n; ++p)
    for (int64_t i = 0; i < rc[p]; ++i, ++row) {
      EXPECT_EQ(g[row * 2], p * 1000 + r * 10 + i);
      EXPECT_EQ(g[row * 2 + 1], -(p * 1000 + r * 10 + i));
    }
}

TEST_P(CommunicatorTest, SendRecvShiftsAlongTheRanks) {
  auto w = comm();
  const int n = w->size(), r = w->rank();
  Tensor mine = on(*w, rank_values(r, 3)), got = on(*w, full({3}, -1.0, DType::kF64));
  w->send_recv(mine, r + 1 < n ? r + 1 : -1, got, r > 0 ? r - 1 : -1);
  const Tensor g = back(*w, got);
  if (r > 0) {
    EXPECT_TRUE(testing::bitwise_equal(g, rank_values(r - 1, 3)));
  } else {
    for (double v : g.to_vector<double>()) EXPECT_EQ(v, -1.0);
  }
}

TEST_P(CommunicatorTest, SplitGroupsReduceWithinThemselves) {
  auto w = comm();
  if (w->size() < 2) GTEST_SKIP() << "needs 2 ranks";
  const int r = w->rank();
  auto half = w->split(r % 2, r, "parity");
  Tensor t = on(*half, full({3}, double(r), DType::kF64));
  half->all_reduce(t, ReduceOp::kSum);
  double expect = 0;
  for (int q = r % 2; q < w->size(); q += 2) expect += q;
  for (double v : back(*half, t).to_vector<double>()) EXPECT_EQ(v, expect);
}

// Ranks may start work on two communicators in different orders (a bucket's all-reduce from a
// gradient hook beside a sequence-parallel exchange: the ranks' autograd graphs differ). Each
// communicator's own order is the same everywhere, which must be enough: with NCCL on one stream
// shared by both, rank 0's GPU would wait in A for rank 1, whose GPU waits in B for rank 0 (seen on
// 2 H200s before each communicator got its own stream).
TEST_P(CommunicatorTest, CommunicatorsProgressIndependently) {
  auto w = comm();
  if (w->size() < 2) GTEST_SKIP() << "needs 2 ranks";
  auto a = w->split(0, w->rank(), "order-a"), b = w->split(0, w->rank(), "order-b");
  const int n = w->size(), r = w->rank();
  Tensor ta = on(*w, rank_values(r, 1 << 20).to(DType::kF32)),
         tb = on(*w, rank_values(r + n, 1 << 20).to(DType::kF32));
  std::unique_ptr<Work> wa, wb;
  if (r % 2 == 0) {
    wa = a->all_reduce_async(ta);
    wb = b->all_reduce_async(tb);
  } else {
    wb = b->all_reduce_async(tb);
    wa = a->all_reduce_async(ta);
  }
  wa->wait();
  wb->wait();
  const auto av = back(*a, ta).to_vector<float>(), bv = back(*b, tb).to_vector<float>();
  double sa = 0, sb = 0;
  for (int q = 0; q < n; ++q) {
    sa += q * 100.0 + 77.5;
    sb += (q + n) * 100.0 + 77.5;
  }
  EXPECT_FLOAT_EQ(av[77], float(sa));
  EXPECT_FLOAT_EQ(bv[77], float(sb));
}

TEST_P(CommunicatorTest, TimeoutNamesTheCallInsteadOfHanging) {
  auto w = comm();
  if (w->size() < 2) GTEST_SKIP() << "needs 2 ranks";
  auto pair = w->split(0, w->rank(), "timeout-test");
  pair->set_timeout(std::chrono::seconds(1));
  if (pair->rank() == 0) {
    Tensor got = on(*pair, zeros({1}, DType::kF64));
    try {
      pair->send_recv(Tensor(), -1, got, 1);  // rank 1 never sends
      pair->synchronize();  // NCCL: the receive is queued on the stream; the wait times out
      ADD_FAILURE() << "receive without a sender returned";
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("did not complete within 1 s"), std::string::npos) << msg;
      EXPECT_NE(msg.find("timeout-test"), std::string::npos) << msg;
      // Over MPI the roll call names the ranks that never came (rank 1 went to the barrier).
      if (GetParam() != Path::kNccl) {
        const char* want = w->size() == 2 ? ": rank 1 did not reach it" : ": ranks 1, 2, 3 did not";
        EXPECT_NE(msg.find(want), std::string::npos) << msg;
      }
    }
  }
  world()->barrier();
}

TEST_P(CommunicatorTest, WrongTensorsGiveClearErrors) {
  auto w = comm();
  Tensor t = on(*w, zeros({2, 3}, DType::kF64));
  Tensor wrong = on(*w, zeros({5}, DType::kF64));
  try {
    w->all_gather(t, wrong);
    ADD_FAILURE() << "accepted a wrong output size";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("all_gather"), std::string::npos);
  }
}

TEST(ProcessGrid, GroupsFollowTheRankLayout) {
  const int n = world()->size();
  for (const GridShape s : {GridShape{n, 1, 1}, GridShape{1, n, 1}, GridShape{1, 1, n},
                            GridShape{n / 2 > 0 ? 2 : 1, 1, n / 2 > 0 ? n / 2 : 1}}) {
    if (s.size() != n) continue;
    auto g = ProcessGrid::create(world(), s, "test.pbtxt");
    ASSERT_TRUE(g.ok()) << g.status().message();
    const ProcessGrid& grid = **g;
    const int64_t r = grid.world().rank();
    EXPECT_EQ(r, (grid.dp_rank() * s.ep + grid.ep_rank()) * s.sp + grid.sp_rank());
    EXPECT_EQ(grid.sp().size(), s.sp);
    EXPECT_EQ(grid.ep().size(), s.ep);
    EXPECT_EQ(grid.expert_replicas().size(), s.dp * s.sp);
    EXPECT_EQ(grid.sp().rank(), grid.sp_rank());
    EXPECT_EQ(grid.ep().rank(), grid.ep_rank());
    // The sp group holds exactly the ranks with our dp and ep coordinates: their sum tells.
    const double sum = grid.sp().all_reduce_host(double(r));
    double expect = 0;
    for (int64_t k = 0; k < s.sp; ++k)
      expect += double((grid.dp_rank() * s.ep + grid.ep_rank()) * s.sp + k);
    EXPECT_EQ(sum, expect);
  }
}

TEST(ProcessGrid, AWrongShapeFailsOnEveryRankWithTheFix) {
  const int n = world()->size();
  auto g = ProcessGrid::create(world(), GridShape{n + 1, 1, 1}, "configs/x.pbtxt");
  ASSERT_FALSE(g.ok());
  const std::string msg = g.status().message();
  EXPECT_NE(msg.find("configs/x.pbtxt"), std::string::npos) << msg;
  EXPECT_NE(msg.find("mpirun -np " + std::to_string(n + 1)), std::string::npos) << msg;
}

}  // namespace
}  // namespace hydra::parallel
