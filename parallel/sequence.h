// Sequence parallelism (spec/algorithms.md sections 3-4): a sequence split over the ranks of `sp`
// in rank order, each rank holding L consecutive tokens (positions [rank * L, (rank + 1) * L)).
// Each function equals the unsplit computation, forward and backward; every rank of `sp` must call
// it.
#pragma once

#include <vector>

#include "autograd/ops.h"
#include "parallel/communicator.h"

namespace hydra::parallel {

// The width - 1 inputs before this shard (rank 0: zeros), for a causal convolution: x [B, L, C] ->
// [B, width - 1, C]. Their gradient goes back to the previous rank. Needs L >= width - 1.
Tensor conv_halo(const Tensor& x, int64_t width, Communicator& sp);

// The selective scan of a split sequence. Each rank scans its shard from a zero state and keeps its
// summary (P = the product of the shard's decays, E = its final state from zero); an all-gather of
// the summaries gives every rank its true initial state H_r = P_{r-1} H_{r-1} + E_{r-1} (H_0 = h0),
// and a second scan from H_r gives the exact outputs. The backward is the mirror exchange (autograd
// through the all-gather). Returns this shard's y and its exact final state.
SelectiveScanResult selective_scan(Communicator& sp, const Tensor& u, const Tensor& delta_raw,
                                   const Tensor& A_log, const Tensor& B, const Tensor& C,
                                   const Tensor& D, const Tensor& dt_bias, const Tensor& z,
                                   const Tensor& h0, int64_t chunk_len);
// The same for the SSD form (hydra::ssd_scan: delta_raw [B, L, H], A_log and dt_bias [H]).
SelectiveScanResult ssd_scan(Communicator& sp, const Tensor& u, const Tensor& delta_raw,
                             const Tensor& A_log, const Tensor& B, const Tensor& C, const Tensor& D,
                             const Tensor& dt_bias, const Tensor& z, const Tensor& h0,
                             int64_t chunk_len);

// Sparse attention (window + global tokens, kernels/attention.h) of this shard's queries over the
// whole sequence, exact. q, k, v [B, L, H, dh] at positions pos0 + i (RoPE already applied). Keys
// come from:
//   the shard itself; the window's halo (the W - 1 positions before pos0, from as many previous
//   shards as it spans: one all-gather of every shard's tail); the global tokens before the halo
//   (one all-gather of every shard's global keys), for the non-global queries; and, for the global
//   queries, which see every earlier position, partial attentions computed where the keys live (the
//   queries travel, not the keys: an all-gather of global queries, an all-to-all of partial outputs
//   and log-sum-exps). The parts are merged with the log-sum-exp rule.
Tensor sparse_attention(Communicator& sp, const Tensor& q, const Tensor& k, const Tensor& v,
                        const AttentionPattern& pattern, double scale, int64_t pos0);

// o = sum_i exp(lse_i - lse) o_i with lse = log sum_i exp(lse_i), per (batch, head, query):
// outs [B, L, H, dh], lses [B, H, L] (-inf: the part saw no key). excluded[i] (optional, per query
// position) drops part i for those queries. Differentiable in every o_i and lse_i. Returns {o,
// lse}.
std::pair<Tensor, Tensor> merge_attention(const std::vector<Tensor>& outs,
                                          const std::vector<Tensor>& lses,
                                          const std::vector<std::vector<uint8_t>>& excluded = {});

}  // namespace hydra::parallel
