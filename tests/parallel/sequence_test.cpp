// Each sequence-parallel exchange on its own, against the unsplit op, forward and backward
// (float64), at odd shard lengths: the convolution halo, the scan's prefix over ranks, the sparse
// attention's halo / global keys / travelling global queries, the rank-to-rank shifts and chains,
// and the log-sum-exp merge. Run under mpirun with 1, 2 and 4 ranks (the world is the sp group).
//
// Harness: every rank builds the same global inputs (same seeds). The reference runs the unsplit op
// on the whole sequence with loss = sum(out * weight); the split run gives each rank positions [r
// L, (r + 1) L) of the sequence inputs and of the loss weights. Then: this shard's outputs equal
// the reference's slice; this shard's input gradients equal the reference's slice; the shared
// inputs' gradients summed over ranks equal the reference's. Relative tolerance 1e-11: the split
// sums in another order (a few ulps); a missing or misplaced exchange is off by far more than 1e-3.
#include "parallel/sequence.h"

#include <gtest/gtest.h>

#include <functional>
#include <limits>

#include "autograd/grad_mode.h"
#include "parallel/collectives.h"
#include "parallel/runtime.h"
#include "tests/test_util.h"

namespace hydra::parallel {
namespace {

using testing::randn64;
using testing::rel_error;

constexpr double kTol = 1e-11;

struct Outputs {
  std::vector<Tensor> seq;  // [B, L, ...] per shard
  Tensor
      final;  // optional: the state after the shard (compared on the last rank, in the loss there)
};
// seq: the sequence inputs ([B, L, ...], split along dim 1); shared: the rest; sp: null = unsplit.
using Fn = std::function<Outputs(const std::vector<Tensor>& seq, const std::vector<Tensor>& shared,
                                 Communicator* sp)>;

std::vector<Tensor> leaves(const std::vector<Tensor>& ts) {
  std::vector<Tensor> out;
  for (const Tensor& t : ts) {
    Tensor c = t.detach().clone();
    c.set_requires_grad(true);
    out.push_back(c);
  }
  return out;
}

Tensor weighted(const Tensor& out, uint64_t seed, int64_t first, int64_t count, int64_t total) {
  Shape s = out.shape();
  s[1] = total;
  const Tensor w = randn64(s, seed, 1.0, false);
  return sum(mul(out, w.narrow(1, first, count)));
}

// Runs fn unsplit and split over the world; `what` names the case in failures.
void expect_split_equals_unsplit(const Fn& fn, const std::vector<Tensor>& seq,
                                 const std::vector<Tensor>& shared, const std::string& what) {
  auto world = world_communicator(false);
  const int R = world->size(), r = world->rank();
  const int64_t T = seq[0].size(1), L = T / R;
  ASSERT_EQ(L * R, T) << what;
  // Reference.
  const auto ref_seq = leaves(seq), ref_shared = leaves(shared);
  const Outputs ref = fn(ref_seq, ref_shared, nullptr);
  Tensor ref_loss = zeros({}, DType::kF64);
  for (std::size_t i = 0; i < ref.seq.size(); ++i)
    ref_loss = add(ref_loss, weighted(ref.seq[i], 100 + i, 0, T, T));
  if (ref.final.defined())
    ref_loss = add(ref_loss, sum(mul(ref.final, randn64(ref.final.shape(), 99, 1.0, false))));
  ref_loss.backward();
  // Split.
  std::vector<Tensor> shard;
  for (const Tensor& t : seq) shard.push_back(t.narrow(1, r * L, L));
  const auto my_seq = leaves(shard), my_shared = leaves(shared);
  const Outputs got = fn(my_seq, my_shared, world.get());
  Tensor loss = zeros({}, DType::kF64);
  for (std::size_t i = 0; i < got.seq.size(); ++i)
    loss = add(loss, weighted(got.seq[i], 100 + i, r * L, L, T));
  if (got.final.defined() && r == R - 1)
    loss = add(loss, sum(mul(got.final, randn64(got.final.shape(), 99, 1.0, false))));
  loss.backward();

  for (std::size_t i = 0; i < ref.seq.size(); ++i)
    EXPECT_LT(rel_error(got.seq[i], ref.seq[i].narrow(1, r * L, L)), kTol)
        << what << ": output " << i << " on rank " << r;
  if (ref.final.defined() && r == R - 1) {
    EXPECT_LT(rel_error(got.final, ref.final), kTol) << what << ": final state";
  }
  for (std::size_t i = 0; i < seq.size(); ++i) {
    ASSERT_TRUE(my_seq[i].grad().defined())
        << what << ": no gradient for sequence input " << i << " on rank " << r;
    EXPECT_LT(rel_error(my_seq[i].grad(), ref_seq[i].grad().narrow(1, r * L, L)), kTol)
        << what << ": gradient of sequence input " << i << " on rank " << r;
  }
  for (std::size_t i = 0; i < shared.size(); ++i) {
    Tensor g = my_shared[i].grad().defined() ? my_shared[i].grad().contiguous().clone()
                                             : zeros_like(my_shared[i]);
    world->all_reduce(g, ReduceOp::kSum);
    EXPECT_LT(rel_error(g, ref_shared[i].grad()), kTol)
        << what << ": gradient of shared input " << i;
  }
}

int world_size() { return world_communicator(false)->size(); }

TEST(SequenceParallel, ConvHaloEqualsTheUnsplitConvolution) {
  const int R = world_size();
  for (const int64_t W : {2, 4}) {
    for (const int64_t L :
         {int64_t(3), int64_t(7)}) {  // L = 3 = W - 1: the halo is the whole shard
      const int64_t B = 2, C = 5, T = L * R;
      const Fn fn = [W](const std::vector<Tensor>& s, const std::vector<Tensor>& p,
                        Communicator* sp) {
        const Tensor prefix = sp != nullptr ? conv_halo(s[0], W, *sp) : Tensor();
        return Outputs{{causal_conv1d(s[0], p[0], p[1], prefix, /*silu=*/true)}, Tensor()};
      };
      expect_split_equals_unsplit(fn, {randn64({B, T, C}, 1)},
                                  {randn64({C, W}, 2, 0.5), randn64({C}, 3, 0.1)},
                                  "conv W=" + std::to_string(W) + " L=" + std::to_string(L));
    }
  }
}

TEST(SequenceParallel, ConvHaloLongerThanTheShardIsAClearError) {
  auto world = world_communicator(false);
  if (world->size() < 2) GTEST_SKIP() << "needs 2 ranks";
  try {
    conv_halo(randn64({1, 2, 3}, 1), 4, *world);
    ADD_FAILURE() << "accepted a 2-token shard for a 3-token halo";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("shorter than the convolution"), std::string::npos)
        << e.what();
  }
}

TEST(SequenceParallel, ScanEqualsTheUnsplitScanWithInitialAndFinalState) {
  const int R = world_size();
  const int64_t B = 2, D = 3, N = 4;
  // Odd shard lengths, chunk boundaries that do not line up with the shards.
  for (const int64_t L : {int64_t(5), int64_t(13)}) {
    const int64_t T = L * R;
    const Fn fn = [](const std::vector<Tensor>& s, const std::vector<Tensor>& p, Communicator* sp) {
      const SelectiveScanResult res =
          sp != nullptr
              ? selective_scan(*sp, s[0], s[1], p[0], s[2], s[3], p[1], p[2], s[4], p[3], 4)
              : hydra::selective_scan(s[0], s[1], p[0], s[2], s[3], p[1], p[2], s[4], p[3], 4);
      return Outputs{{res.y}, res.h_last};
    };
    expect_split_equals_unsplit(
        fn,
        {randn64({B, T, D}, 11), randn64({B, T, D}, 12, 0.5), randn64({B, T, N}, 13),
         randn64({B, T, N}, 14), randn64({B, T, D}, 15)},
        {randn64({D, N}, 16, 0.3), randn64({D}, 17), randn64({D}, 18, 0.2), randn64({B, D, N}, 19)},
        "scan L=" + std::to_string(L));
  }
}

TEST(SequenceParallel, SsdScanEqualsTheUnsplitScanWithInitialAndFinalState) {
  const int R = world_size();
  const int64_t B = 2, H = 2, P = 3, D = H * P, N = 4;
  // Odd shard lengths; SSD chunks of 4 that do not line up with the shards.
  for (const int64_t L : {int64_t(5), int64_t(13)}) {
    const int64_t T = L * R;
    const Fn fn = [](const std::vector<Tensor>& s, const std::vector<Tensor>& p, Communicator* sp) {
      const SelectiveScanResult res =
          sp != nullptr ? ssd_scan(*sp, s[0], s[1], p[0], s[2], s[3], p[1], p[2], s[4], p[3], 4)
                        : hydra::ssd_scan(s[0], s[1], p[0], s[2], s[3], p[1], p[2], s[4], p[3], 4);
      return Outputs{{res.y}, res.h_last};
    };
    expect_split_equals_unsplit(
        fn,
        {randn64({B, T, D}, 31), randn64({B, T, H}, 32, 0.5), randn64({B, T, N}, 33),
         randn64({B, T, N}, 34), randn64({B, T, D}, 35)},
        {randn64({H}, 36, 0.3), randn64({D}, 37), randn64({H}, 38, 0.2), randn64({B, D, N}, 39)},
        "ssd L=" + std::to_string(L));
  }
}

TEST(SequenceParallel, SparseAttentionEqualsTheUnsplitAttention) {
  const int R = world_size();
  const int64_t B = 2, H = 2, dh = 3;
  struct Case {
    int64_t L;
    AttentionPattern pat;
  };
  // Windows inside one shard, spanning several shards, unlimited (dense causal); global strides
  // that put global tokens inside, at the edge of, and outside the shards; none.
  const std::vector<Case> cases = {{7, {3, 0}}, {7, {5, 4}}, {5, {13, 3}},
                                   {9, {0, 0}}, {6, {4, 6}}, {7, {2, 11}}};
  for (const Case& c : cases) {
    const int64_t T = c.L * R;
    const AttentionPattern pat = c.pat;
    const Fn fn = [pat, L = c.L](const std::vector<Tensor>& s, const std::vector<Tensor>&,
                                 Communicator* sp) {
      const Tensor o = sp != nullptr
                           ? sparse_attention(*sp, s[0], s[1], s[2], pat, 0.6, sp->rank() * L)
                           : hydra::sparse_attention(s[0], s[1], s[2], pat, 0.6);
      return Outputs{{o}, Tensor()};
    };
    expect_split_equals_unsplit(
        fn, {randn64({B, T, H, dh}, 21), randn64({B, T, H, dh}, 22), randn64({B, T, H, dh}, 23)},
        {},
        "attention L=" + std::to_string(c.L) + " window=" + std::to_string(pat.window) +
            " stride=" + std::to_string(pat.global_stride));
  }
}

TEST(SequenceParallel, ShiftsAndChainsMoveValuesAndGradientsBetweenNeighbours) {
  const int R = world_size();
  // shift_from_previous: out_r = x_{r-1} (rank 0: zeros); shift_from_next: out_r = x_{r+1}.
  // receive_from_previous + send_to_next: a chain s_r = f(s_{r-1}) with s_0 = first, here f(s) = 2
  // s + x_r.
  const Fn fn = [R](const std::vector<Tensor>& s, const std::vector<Tensor>& p, Communicator* sp) {
    const Tensor x = s[0];  // [1, L, 3]
    if (sp == nullptr) {
      const int64_t L = x.size(1) / R;
      std::vector<Tensor> prev, next, chain;
      Tensor state = p[0];
      for (int r = 0; r < R; ++r) {
        const Tensor xr = x.narrow(1, r * L, L);
        prev.push_back(r == 0 ? zeros_like(xr) : x.narrow(1, (r - 1) * L, L));
        next.push_back(r == R - 1 ? zeros_like(xr) : x.narrow(1, (r + 1) * L, L));
        if (r > 0) state = add(mul(state, full({}, 2.0, DType::kF64)), xr.narrow(1, 0, 1));
        chain.push_back(mul(state, xr));
      }
      return Outputs{{concat(prev, 1), concat(next, 1), concat(chain, 1)}, Tensor()};
    }
    Tensor state = receive_from_previous(p[0], *sp);
    if (sp->rank() > 0) state = add(mul(state, full({}, 2.0, DType::kF64)), x.narrow(1, 0, 1));
    const Tensor sent = send_to_next(state, *sp);
    // The zero scalar from send_to_next joins the outputs so that its node is in the graph.
    return Outputs{{shift_from_previous(x, *sp), shift_from_next(x, *sp), add(mul(state, x), sent)},
                   Tensor()};
  };
  expect_split_equals_unsplit(fn, {randn64({1, 5 * R, 3}, 31)}, {randn64({1, 1, 3}, 32)},
                              "shifts and chain");
}

TEST(SequenceParallel, AllGatherAndAllToAllBackwardAreTheirAdjoints) {
  auto world = world_communicator(false);
  const int R = world->size(), r = world->rank();
  // all_gather then a rank-dependent weighting: d/dx_r sum_q w_q . gathered_q = sum over ranks of
  // w_r.
  Tensor x = randn64({2, 3}, 40 + r);
  const Tensor g = all_gather(x, *world);
  ASSERT_EQ(g.size(0), 2 * R);
  Tensor w = randn64({2 * R, 3}, 50 + r, 1.0, false);
  sum(mul(g, w)).backward();
  Tensor expect = zeros({2, 3}, DType::kF64);
  for (int q = 0; q < R; ++q)
    expect = add(expect, randn64({2 * R, 3}, 50 + q, 1.0, false).narrow(0, r * 2, 2));
  EXPECT_LT(rel_error(x.grad(), expect), kTol);
  // all_to_all with uneven counts: rank r sends (r + p) % 2 + 1 rows to p; gradient flows back.
  std::vector<int64_t> sc(R), rc(R);
  int64_t ns = 0, nr = 0;
  for (int p = 0; p < R; ++p) {
    sc[p] = (r + p) % 2 + 1;
    rc[p] = (p + r) % 2 + 1;
    ns += sc[p];
    nr += rc[p];
  }
  Tensor y = randn64({ns, 2}, 60 + r);
  const Tensor moved = all_to_all(y, sc, rc, *world);
  ASSERT_EQ(moved.size(0), nr);
  sum(mul(moved, moved)).backward();
  EXPECT_LT(rel_error(y.grad(), mul(y, full({}, 2.0, DType::kF64))),
            kTol);  // d/dy sum(y^2) wherever y went
}

TEST(SequenceParallel, MergeAttentionGradcheckFloat64WithExcludedParts) {
  // Three partial attentions of 5 queries; part 1 dropped for queries 1 and 3, part 2 empty (-inf)
  // for query 4 — the cases sequence-parallel attention produces.
  const int64_t B = 2, L = 5, H = 2, dh = 3;
  std::vector<Tensor> inputs;
  for (int i = 0; i < 3; ++i) inputs.push_back(randn64({B, L, H, dh}, 70 + i));
  for (int i = 0; i < 3; ++i) inputs.push_back(randn64({B, H, L}, 80 + i));
  {
    NoGradGuard ng;
    auto lse2 = inputs[5].to_vector<double>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        lse2[(b * H + h) * L + 4] = -std::numeric_limits<double>::infinity();
    inputs[5] = tensor(lse2, {B, H, L});
    inputs[5].set_requires_grad(true);
  }
  const std::vector<std::vector<uint8_t>> excluded = {{}, {0, 1, 0, 1, 0}, {}};
  HYDRA_EXPECT_GRADCHECK(
      [&](const std::vector<Tensor>& in) {
        auto [o, lse] = merge_attention({in[0], in[1], in[2]}, {in[3], in[4], in[5]}, excluded);
        return std::vector<Tensor>{o, lse};
      },
      inputs);
}

}  // namespace
}  // namespace hydra::parallel
