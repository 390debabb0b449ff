// Shared by the sparse-attention kernels (attention.cu: SIMT cores; attention_mma.cu: tensor
// cores): the tile sizes, the pattern and the walks of keys and queries it gives, the element
// offsets of q/k/v and the outputs, and the shared-memory carving.
#pragma once

#include <cstdint>

#include "kernels/attention.h"
#include "kernels/base/fast_mod.h"
#include "kernels/cuda/common.cuh"

namespace hydra::kernels::cuda {
namespace {

constexpr int kTile =
    32;  // queries per block and keys per step (dK/dV: keys per block, queries per step)
constexpr int kThreads = 128;

struct Pattern {
  int64_t window, stride, q_pos0, k_pos0;
  FastDivisor stride_div;  // stride, where it fits 31 bits (pattern_of)
  // A multiply and a shift where positions fit 31 bits (a 64-bit remainder costs a long sequence).
  __device__ bool global(int64_t pos) const {
    if (stride <= 0) return false;
    if (pos >= 0 && pos <= INT32_MAX && stride <= INT32_MAX)
      return stride_div.mod(static_cast<uint32_t>(pos)) == 0;
    return pos % stride == 0;
  }
  // Whether a global position lies in [lo, hi].
  __device__ bool any_global(int64_t lo, int64_t hi) const;
  __device__ bool visible(int64_t tq, int64_t tk) const {
    return tk <= tq && (window <= 0 || tq - tk < window || global(tk) || global(tq));
  }
};

// An ordered index list made of two arithmetic runs: start0 + o * step0 (o < n0), then start1 + o *
// step1.
struct Runs {
  int64_t start0 = 0, step0 = 1, n0 = 0, start1 = 0, step1 = 1, n1 = 0;
  __device__ int64_t count() const { return n0 + n1; }
  __device__ int64_t at(int64_t o) const {
    return o < n0 ? start0 + o * step0 : start1 + (o - n0) * step1;
  }
};

__host__ __device__ inline int64_t first_multiple_at_or_after(int64_t pos, int64_t stride) {
  return pos <= 0 ? 0 : (pos + stride - 1) / stride * stride;
}

// How many of the positions pos0 .. pos0 + len - 1 are global (stride > 0), and the first's index.
__host__ __device__ inline int64_t first_global_index(int64_t pos0, int64_t stride) {
  return first_multiple_at_or_after(pos0, stride) - pos0;
}
__host__ __device__ inline int64_t count_global(int64_t pos0, int64_t len, int64_t stride) {
  const int64_t g0 = first_global_index(pos0, stride);
  return g0 < len ? (len - 1 - g0) / stride + 1 : 0;
}

// What a walk covers. kAuto: the band and the global positions, and every row when one of the
// block's own rows is global (or the window is unlimited). kBand: the band and the global
// positions even then (the block's global rows are another block's). kFull: every row the
// causal order allows.
enum class WalkMode { kAuto, kBand, kFull };

__device__ bool Pattern::any_global(int64_t lo, int64_t hi) const {
  return stride > 0 && lo <= hi && first_multiple_at_or_after(lo, stride) <= hi;
}

// Keys that queries [i0, i1) may see: the global keys before the window band, then the band; every
// earlier key when a query is global (kAuto) or the window is unlimited.
__device__ Runs keys_for_queries(const Pattern& pat, int64_t k_len, int64_t i0, int64_t i1,
                                 WalkMode mode = WalkMode::kAuto) {
  Runs r;
  const int64_t tq_min = pat.q_pos0 + i0, tq_max = pat.q_pos0 + i1 - 1;
  const int64_t j_end = min(k_len, tq_max - pat.k_pos0 + 1);
  if (j_end <= 0) return r;
  const bool full = mode == WalkMode::kFull || pat.window <= 0 ||
                    (mode == WalkMode::kAuto && pat.any_global(tq_min, tq_max));
  int64_t j_band = 0;
  if (!full) {
    j_band = max(int64_t(0), min(j_end, tq_min - pat.window + 1 - pat.k_pos0));
    if (pat.stride > 0 && j_band > 0) {
      const int64_t g0 = first_multiple_at_or_after(pat.k_pos0, pat.stride),
                    limit = pat.k_pos0 + j_band;
      r.start0 = g0 - pat.k_pos0;
      r.step0 = pat.stride;
      r.n0 = g0 < limit ? (limit - 1 - g0) / pat.stride + 1 : 0;
    }
  }
  r.start1 = j_band;
  r.n1 = j_end - j_band;
  return r;
}

// Queries that may see keys [j0, j1): the band from the first key on, then the global queries after
// it; every later query when a key is global (kAuto) or the window is unlimited.
__device__ Runs queries_for_keys(const Pattern& pat, int64_t q_len, int64_t j0, int64_t j1,
                                 WalkMode mode = WalkMode::kAuto) {
  Runs r;
  const int64_t tk_min = pat.k_pos0 + j0, tk_max = pat.k_pos0 + j1 - 1;
  const int64_t i_start = max(int64_t(0), tk_min - pat.q_pos0);
  if (i_start >= q_len) return r;
  const bool full = mode == WalkMode::kFull || pat.window <= 0 ||
                    (mode == WalkMode::kAuto && pat.any_global(tk_min, tk_max));
  r.start0 = i_start;
  if (full) {
    r.n0 = q_len - i_start;
    return r;
  }
  const int64_t i_band_end = max(i_start, min(q_len, tk_max + pat.window - pat.q_pos0));
  r.n0 = i_band_end - i_start;
  if (pat.stride > 0) {
    const int64_t g0 = first_multiple_at_or_after(pat.q_pos0 + i_band_end, pat.stride),
                  limit = pat.q_pos0 + q_len;
    r.start1 = g0 - pat.q_pos0;
    r.step1 = pat.stride;
    r.n1 = g0 < limit ? (limit - 1 - g0) / pat.stride + 1 : 0;
  }
  return r;
}

// Element offsets of a token's head in q/k/v ([B, L, H, dh] with tokens *_row apart) and in the
// contiguous outputs and gradients.
struct Layout {
  int64_t heads, q_len, k_len, dh, q_row, k_row, v_row;
  __device__ int64_t q(int64_t b, int64_t i, int64_t h) const {
    return (b * q_len + i) * q_row + h * dh;
  }
  __device__ int64_t k(int64_t b, int64_t j, int64_t h) const {
    return (b * k_len + j) * k_row + h * dh;
  }
  __device__ int64_t v(int64_t b, int64_t j, int64_t h) const {
    return (b * k_len + j) * v_row + h * dh;
  }
  __device__ int64_t dq(int64_t b, int64_t i, int64_t h) const {
    return ((b * q_len + i) * heads + h) * dh;
  }
  __device__ int64_t dk(int64_t b, int64_t j, int64_t h) const {
    return ((b * k_len + j) * heads + h) * dh;
  }
  __device__ int64_t stat(int64_t b, int64_t h, int64_t i) const {
    return (b * heads + h) * q_len + i;
  }
};

Pattern pattern_of(const AttentionParams& p) {
  Pattern pat{p.window, p.global_stride, p.q_pos0, p.k_pos0, FastDivisor()};
  if (p.global_stride > 0 && p.global_stride <= INT32_MAX)
    pat.stride_div = FastDivisor(static_cast<uint32_t>(p.global_stride));
  return pat;
}

Layout layout_of(const AttentionParams& p) {
  return {p.heads, p.q_len, p.k_len, p.head_dim, p.q_row, p.k_row, p.v_row};
}

// Each kernel's dynamic shared memory, carved into arrays in order. The host runs the same carving
// from address 0 to get the size to launch with, so the two cannot disagree.
class Carve {
 public:
  __host__ __device__ explicit Carve(unsigned char* base)
      : at_(reinterpret_cast<uintptr_t>(base)) {}
  template <class E>
  __host__ __device__ E* take(int64_t n) {
    E* p = reinterpret_cast<E*>(at_);
    at_ += static_cast<uintptr_t>(n) * sizeof(E);
    return p;
  }
  __host__ __device__ uintptr_t end() const { return at_; }

 private:
  uintptr_t at_;
};

}  // namespace

// The tensor-core kernels (attention_mma.cu), for bf16 with head sizes that are multiples of 16 up
// to 128 and rows on 16-byte boundaries.
namespace attention_mma {
bool applies(const AttentionParams& p);
bool applies(const AttentionBwdParams& q);
void forward(const AttentionParams& p);
// delta: dO . O - glse per query (attention.cu's attn_delta_kernel); parts:
// backward_workspace(q.fwd) bytes.
void backward(const AttentionBwdParams& q, const float* delta, void* parts);
// Bytes for the partial rows of the blocks of global rows whose walks are cut into segments.
size_t forward_workspace(const AttentionParams& p);
size_t backward_workspace(const AttentionParams& p);
}  // namespace attention_mma

// cuDNN's fused flash attention (attention_cudnn.cu) for dense causal attention and its sliding
// window over whole sequences: applies() builds (or finds) the shape's plan, false where the
// pattern, the types or the layout do not fit or cuDNN refused it (HYDRA_ATTENTION=ours: never).
namespace attention_cudnn {
bool applies(const AttentionParams& p);
bool applies(const AttentionBwdParams& q);
void forward(const AttentionParams& p);
void backward(const AttentionBwdParams& q);
size_t forward_workspace(const AttentionParams& p);
size_t backward_workspace(const AttentionBwdParams& q);
}  // namespace attention_cudnn

}  // namespace hydra::kernels::cuda
