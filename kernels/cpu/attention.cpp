// CPU flash-style sparse causal attention. A task owns one (batch, head); it walks query tiles of
// kTq rows; for each tile it visits only the key blocks the pattern can reach: the window band
// before the tile, plus the global keys before the band (or every earlier key when the tile holds a
// global query or the window is unlimited). Scores live in a kTq x kTk buffer; softmax is online
// (running max and sum), and the backward recomputes probabilities from the saved log-sum-exp.
#include "kernels/attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/base/parallel.h"
#include "kernels/cpu/common.h"

namespace hydra::kernels::cpu {
namespace {

constexpr int64_t kTq = 32;
constexpr int64_t kTk = 64;

struct Pattern {
  int64_t window, stride, q_pos0, k_pos0;
  bool global(int64_t pos) const { return stride > 0 && pos % stride == 0; }
  bool visible(int64_t tq, int64_t tk) const {
    return tk <= tq && (window <= 0 || tq - tk < window || global(tk) || global(tq));
  }
};

// Calls fn(keys, count) for each block of key indices that queries [i0, i1) may see.
template <class F>
void for_each_key_block(const Pattern& pat, int64_t k_len, int64_t i0, int64_t i1, F&& fn) {
  const int64_t tq_min = pat.q_pos0 + i0, tq_max = pat.q_pos0 + i1 - 1;
  const int64_t j_end = std::min(k_len, tq_max - pat.k_pos0 + 1);
  if (j_end <= 0) return;
  bool full = pat.window <= 0;
  for (int64_t i = i0; i < i1 && !full; ++i) full = pat.global(pat.q_pos0 + i);
  int64_t j_band = 0;
  int64_t keys[kTk];
  if (!full) {
    j_band = std::clamp<int64_t>(tq_min - pat.window + 1 - pat.k_pos0, 0, j_end);
    if (pat.stride > 0 && j_band > 0) {  // global keys before the band
      int64_t n = 0;
      int64_t first = (pat.k_pos0 + pat.stride - 1) / pat.stride * pat.stride;
      if (pat.k_pos0 <= 0) first = 0;
      for (int64_t pos = std::max<int64_t>(first, 0); pos - pat.k_pos0 < j_band;
           pos += pat.stride) {
        if (pos < pat.k_pos0) continue;
        keys[n++] = pos - pat.k_pos0;
        if (n == kTk) {
          fn(keys, n);
          n = 0;
        }
      }
      if (n > 0) fn(keys, n);
    }
  }
  for (int64_t j0 = j_band; j0 < j_end; j0 += kTk) {
    const int64_t n = std::min(kTk, j_end - j0);
    for (int64_t jj = 0; jj < n; ++jj) keys[jj] = j0 + jj;
    fn(keys, n);
  }
}

template <class T>
struct Heads {
  const AttentionParams& p;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* qrow(int64_t b, int64_t i, int64_t h) const {
    return q + (b * p.q_len + i) * p.q_row + h * p.head_dim;
  }
  const T* krow(int64_t b, int64_t j, int64_t h) const {
    return k + (b * p.k_len + j) * p.k_row + h * p.head_dim;
  }
  const T* vrow(int64_t b, int64_t j, int64_t h) const {
    return v + (b * p.k_len + j) * p.v_row + h * p.head_dim;
  }
  // Offset of [b, i, h, 0] in a contiguous [B, L, H, dh] tensor.
  int64_t dense(int64_t b, int64_t i, int64_t h, int64_t len) const {
    return ((b * len + i) * p.heads + h) * p.head_dim;
  }
};

// Copies a key block transposed ([dh][kTk], so a row's scores vectorise over keys) and marks which
// of its keys are global (the pattern's modulo, once per key rather than once per pair).
template <class T>
void load_block(const Heads<T>& hd, int64_t b, int64_t h, const int64_t* keys, int64_t nk,
                const Pattern& pat, T* kt, bool* kglob) {
  const int64_t dh = hd.p.head_dim;
  for (int64_t jj = 0; jj < nk; ++jj) {
    const T* kj = hd.krow(b, keys[jj], h);
    for (int64_t c = 0; c < dh; ++c) kt[c * kTk + jj] = kj[c];
    kglob[jj] = pat.global(pat.k_pos0 + keys[jj]);
  }
}

// Scaled scores of query q (at position tq) against a loaded block; -inf where the pattern masks.
// Returns the row's maximum (-inf when nothing is visible).
template <class T>
T row_scores(const T* q, const T* kt, const int64_t* keys, const bool* kglob, int64_t nk,
             int64_t dh, int64_t tq, const Pattern& pat, T scale, T* __restrict out) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  for (int64_t jj = 0; jj < nk; ++jj) out[jj] = 0;
  for (int64_t c = 0; c < dh; ++c) {
    const T qc = q[c] * scale;
    const T* __restrict kc = kt + c * kTk;
    for (int64_t jj = 0; jj < nk; ++jj) out[jj] += qc * kc[jj];
  }
  const bool qglob = pat.global(tq);
  T mx = kNegInf;
  for (int64_t jj = 0; jj < nk; ++jj) {
    const int64_t tk = pat.k_pos0 + keys[jj];
    const bool vis = tk <= tq && (pat.window <= 0 || tq - tk < pat.window || kglob[jj] || qglob);
    if (!vis) out[jj] = kNegInf;
    mx = std::max(mx, out[jj]);
  }
  return mx;
}

template <class T>
T dot(const T* a, const T* b, int64_t n) {
  T s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <class T>
void attention_fwd_impl(const AttentionParams& p) {
  const Heads<T> hd{p};
  const Pattern pat{p.window, p.global_stride, p.q_pos0, p.k_pos0};
  const int64_t dh = p.head_dim, tiles = (p.q_len + kTq - 1) / kTq;
  T* out = static_cast<T*>(p.out);
  T* lse = static_cast<T*>(p.lse);
  const T scale = static_cast<T>(p.scale);
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  parallel_for(p.batch * p.heads * tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> m(kTq), l(kTq), acc(kTq * dh), s(kTq * kTk), kt(dh * kTk);
    bool kglob[kTk];
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t tile = task % tiles, bh = task / tiles, b = bh / p.heads, h = bh % p.heads;
      const int64_t i0 = tile * kTq, i1 = std::min(p.q_len, i0 + kTq), nq = i1 - i0;
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), T(0));
      std::fill(acc.begin(), acc.end(), T(0));
      for_each_key_block(pat, p.k_len, i0, i1, [&](const int64_t* keys, int64_t nk) {
        load_block(hd, b, h, keys, nk, pat, kt.data(), kglob);
        for (int64_t ii = 0; ii < nq; ++ii) {
          const int64_t tq = p.q_pos0 + i0 + ii;
          T* sr = s.data() + ii * kTk;
          const T row_max = row_scores(hd.qrow(b, i0 + ii, h), kt.data(), keys, kglob, nk, dh, tq,
                                       pat, scale, sr);
          if (row_max == kNegInf) continue;
          const T m_new = std::max(m[ii], row_max);
          const T correction = m[ii] == kNegInf ? T(0) : std::exp(m[ii] - m_new);
          T* a = acc.data() + ii * dh;
          for (int64_t c = 0; c < dh; ++c) a[c] *= correction;
          T sum = 0;
          for (int64_t jj = 0; jj < nk; ++jj) {
            const T sc = sr[jj];
            if (sc == kNegInf) continue;
            const T pr = std::exp(sc - m_new);
            sum += pr;
            const T* vj = hd.vrow(b, keys[jj], h);
            for (int64_t c = 0; c < dh; ++c) a[c] += pr * vj[c];
          }
          l[ii] = l[ii] * correction + sum;
          m[ii] = m_new;
        }
      });
      for (int64_t ii = 0; ii < nq; ++ii) {
        T* o = out + hd.dense(b, i0 + ii, h, p.q_len);
        const T inv = l[ii] > T(0) ? T(1) / l[ii] : T(0);
        for (int64_t c = 0; c < dh; ++c) o[c] = acc[ii * dh + c] * inv;
        lse[(b * p.heads + h) * p.q_len + i0 + ii] =
            l[ii] > T(0) ? m[ii] + std::log(l[ii]) : kNegInf;
      }
    }
  });
}

template <class T>
void attention_bwd_impl(const AttentionBwdParams& q) {
  const AttentionParams& p = q.fwd;
  const Heads<T> hd{p};
  const Pattern pat{p.window, p.global_stride, p.q_pos0, p.k_pos0};
  const int64_t dh = p.head_dim, tiles = (p.q_len + kTq - 1) / kTq;
  const T* out = static_cast<const T*>(p.out);
  const T* lse = static_cast<const T*>(p.lse);
  const T* gout = static_cast<const T*>(q.gout);
  const T* glse = static_cast<const T*>(q.glse);
  T* gq = static_cast<T*>(q.gq);
  T* gk = static_cast<T*>(q.gk);
  T* gv = static_cast<T*>(q.gv);
  const T scale = static_cast<T>(p.scale);
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  parallel_for(p.batch * p.heads, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> delta(kTq), s(kTk), dp(kTk), kt(dh * kTk), vt(dh * kTk);
    bool kglob[kTk];
    for (int64_t bh = t0; bh < t1; ++bh) {
      const int64_t b = bh / p.heads, h = bh % p.heads;
      for (int64_t j = 0; j < p.k_len; ++j) {
        std::fill_n(gk + hd.dense(b, j, h, p.k_len), dh, T(0));
        std::fill_n(gv + hd.dense(b, j, h, p.k_len), dh, T(0));
      }
      for (int64_t tile = 0; tile < tiles; ++tile) {
        const int64_t i0 = tile * kTq, i1 = std::min(p.q_len, i0 + kTq), nq = i1 - i0;
        for (int64_t ii = 0; ii < nq; ++ii) {
          const int64_t off = hd.dense(b, i0 + ii, h, p.q_len);
          delta[ii] = dot(gout + off, out + off, dh);  // D_i = dO_i . O_i
          // d lse_i / d s_ij = P_ij: a gradient on lse enters as dS_ij += P_ij * glse_i.
          if (glse != nullptr) delta[ii] -= glse[(b * p.heads + h) * p.q_len + i0 + ii];
          std::fill_n(gq + off, dh, T(0));
        }
        for_each_key_block(pat, p.k_len, i0, i1, [&](const int64_t* keys, int64_t nk) {
          load_block(hd, b, h, keys, nk, pat, kt.data(), kglob);
          for (int64_t jj = 0; jj < nk; ++jj) {  // V transposed too, for the dO . V_j row
            const T* vj = hd.vrow(b, keys[jj], h);
            for (int64_t c = 0; c < dh; ++c) vt[c * kTk + jj] = vj[c];
          }
          for (int64_t ii = 0; ii < nq; ++ii) {
            const int64_t tq = p.q_pos0 + i0 + ii;
            const T row_lse = lse[(b * p.heads + h) * p.q_len + i0 + ii];
            if (row_lse == kNegInf) continue;
            const T* qi = hd.qrow(b, i0 + ii, h);
            const T* go = gout + hd.dense(b, i0 + ii, h, p.q_len);
            T* gqi = gq + hd.dense(b, i0 + ii, h, p.q_len);
            T* sr = s.data();
            if (row_scores(qi, kt.data(), keys, kglob, nk, dh, tq, pat, scale, sr) == kNegInf)
              continue;
            for (int64_t jj = 0; jj < nk; ++jj) dp[jj] = 0;
            for (int64_t c = 0; c < dh; ++c) {  // dp_j = dO_i . V_j, vectorised over keys
              const T g = go[c];
              const T* __restrict vc = vt.data() + c * kTk;
              for (int64_t jj = 0; jj < nk; ++jj) dp[jj] += g * vc[jj];
            }
            for (int64_t jj = 0; jj < nk; ++jj) {
              if (sr[jj] == kNegInf) continue;
              const int64_t j = keys[jj];
              const T prob = std::exp(sr[jj] - row_lse);
              const T dsc = prob * (dp[jj] - delta[ii]) * scale;
              const T* kj = hd.krow(b, j, h);
              T* gvj = gv + hd.dense(b, j, h, p.k_len);
              T* gkj = gk + hd.dense(b, j, h, p.k_len);
              for (int64_t c = 0; c < dh; ++c) {
                gvj[c] += prob * go[c];
                gqi[c] += dsc * kj[c];
                gkj[c] += dsc * qi[c];
              }
            }
          }
        });
      }
    }
  });
}

// The merge's rows: (b, h, l) in lse order, with the offset of its out row.
struct MergeRows {
  int64_t B, L, H, dh, rows, out_part, lse_part;
  explicit MergeRows(const MergeAttentionParams& p)
      : B(p.batch),
        L(p.len),
        H(p.heads),
        dh(p.head_dim),
        rows(p.batch * p.heads * p.len),
        out_part(p.batch * p.len * p.heads * p.head_dim),
        lse_part(p.batch * p.heads * p.len) {}
  int64_t out_offset(int64_t row) const {
    const int64_t l = row % L, bh = row / L;
    return ((bh / H * L + l) * H + bh % H) * dh;
  }
};

template <class T>
void merge_attention_fwd_impl(const MergeAttentionParams& p) {
  const MergeRows m(p);
  const T* outs = static_cast<const T*>(p.outs);
  const T* lses = static_cast<const T*>(p.lses);
  T* out = static_cast<T*>(p.out);
  T* lse = static_cast<T*>(p.lse);
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  parallel_for(m.rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      T mx = kNegInf;
      for (int64_t i = 0; i < p.parts; ++i) mx = std::max(mx, lses[i * m.lse_part + row]);
      T* dst = out + m.out_offset(row);
      std::fill_n(dst, m.dh, T(0));
      if (mx == kNegInf) {
        lse[row] = kNegInf;
        continue;
      }
      T z = 0;
      for (int64_t i = 0; i < p.parts; ++i) z += std::exp(lses[i * m.lse_part + row] - mx);
      for (int64_t i = 0; i < p.parts; ++i) {
        const T w = std::exp(lses[i * m.lse_part + row] - mx) / z;
        if (w == T(0)) continue;
        const T* src = outs + i * m.out_part + m.out_offset(row);
        for (int64_t c = 0; c < m.dh; ++c) dst[c] += w * src[c];
      }
      lse[row] = mx + std::log(z);
    }
  });
}

template <class T>
void merge_attention_bwd_impl(const MergeAttentionBwdParams& q) {
  const MergeAttentionParams& p = q.fwd;
  const MergeRows m(p);
  const T* outs = static_cast<const T*>(p.outs);
  const T* lses = static_cast<const T*>(p.lses);
  const T* out = static_cast<const T*>(p.out);
  const T* lse = static_cast<const T*>(p.lse);
  const T* gout = static_cast<const T*>(q.gout);
  const T* glse = static_cast<const T*>(q.glse);
  T* gouts = static_cast<T*>(q.gouts);
  T* glses = static_cast<T*>(q.glses);
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  parallel_for(m.rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t o = m.out_offset(row);
      T go_o = 0;
      if (gout != nullptr)
        for (int64_t c = 0; c < m.dh; ++c) go_o += gout[o + c] * out[o + c];
      const T extra = glse != nullptr ? glse[row] : T(0);
      for (int64_t i = 0; i < p.parts; ++i) {
        const T li = lses[i * m.lse_part + row];
        const T w = li == kNegInf || lse[row] == kNegInf ? T(0) : std::exp(li - lse[row]);
        const T* oi = outs + i * m.out_part + o;
        T* gi = gouts + i * m.out_part + o;
        T go_oi = 0;
        for (int64_t c = 0; c < m.dh; ++c) {
          const T g = gout != nullptr ? gout[o + c] : T(0);
          gi[c] = w * g;
          go_oi += g * oi[c];
        }
        glses[i * m.lse_part + row] = w == T(0) ? T(0) : w * (go_oi - go_o + extra);
      }
    }
  });
}

}  // namespace

void merge_attention_fwd(const MergeAttentionParams& p) {
  dispatch_float(p.dtype, "merge_attention",
                 [&](auto tag) { merge_attention_fwd_impl<typename decltype(tag)::type>(p); });
}

void merge_attention_bwd(const MergeAttentionBwdParams& p) {
  dispatch_float(p.fwd.dtype, "merge_attention_backward",
                 [&](auto tag) { merge_attention_bwd_impl<typename decltype(tag)::type>(p); });
}

void attention_fwd(const AttentionParams& p) {
  dispatch_float(p.dtype, "attention",
                 [&](auto tag) { attention_fwd_impl<typename decltype(tag)::type>(p); });
}

void attention_bwd(const AttentionBwdParams& p) {
  dispatch_float(p.fwd.dtype, "attention_backward",
                 [&](auto tag) { attention_bwd_impl<typename decltype(tag)::type>(p); });
}

}  // namespace hydra::kernels::cpu
