// CPU selective scan. A task is (batch b, block of kBlock channels); it walks time with the block's
// states in a small local array. The backward walks chunks last to first: it recomputes the chunk's
// states and decays from the saved chunk-start state, then runs the adjoint recursion
//   G_t = gh_t (total gradient on h_t) = C_t * gy_t + a_{t+1} * G_{t+1}
// (spec/algorithms.md section 2). Sums over channels (gB, gC) and over batch (gA, gD, gdt_bias) go
// through per-task partial buffers combined in a fixed order: thread-count independent.
#include "kernels/selective_scan.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/base/parallel.h"
#include "kernels/cpu/common.h"

namespace hydra::kernels::cpu {
namespace {

constexpr int64_t kBlock = 16;

// x = exp(x) over a contiguous run: one flat loop GCC turns into glibc's vector exp (libmvec).
template <class T>
void exp_inplace(T* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i]);
}

template <class T>
struct ScanView {
  const SelectiveScanParams& p;
  const T* u = static_cast<const T*>(p.u);
  const T* delta = static_cast<const T*>(p.delta);
  const T* z = static_cast<const T*>(p.z);
  const T* Bm = static_cast<const T*>(p.B);
  const T* Cm = static_cast<const T*>(p.C);
  const T* dt_bias = static_cast<const T*>(p.dt_bias);
  const T* A_log = static_cast<const T*>(p.A_log);
  const T* Dskip = static_cast<const T*>(p.D);

  int64_t row(int64_t b, int64_t t) const { return b * p.len + t; }
  T u_at(int64_t r, int64_t d) const { return u[r * p.u_row + d]; }
  T raw_delta(int64_t r, int64_t d) const {
    return delta[r * p.delta_row + d] + (dt_bias ? dt_bias[d] : T(0));
  }
  T z_at(int64_t r, int64_t d) const { return z[r * p.z_row + d]; }
  const T* B_at(int64_t r) const { return Bm + r * p.B_row; }
  const T* C_at(int64_t r) const { return Cm + r * p.C_row; }
  T D_at(int64_t d) const { return Dskip ? Dskip[d] : T(0); }
  T A_at(int64_t d, int64_t n) const { return -std::exp(A_log[d * p.state + n]); }
};

// Per token and channel, computed in flat passes that vectorise (glibc's vector exp and log1p)
// before the sequential time loop: delta = softplus(raw), its derivative sigmoid(raw), sigmoid(z).
template <class T>
struct Pointwise {
  std::vector<T> delta, delta_grad, z_sig;
};

template <class T>
Pointwise<T> pointwise(const ScanView<T>& v, bool with_grad) {
  const SelectiveScanParams& p = v.p;
  const int64_t rows = p.batch * p.len, D = p.dim;
  Pointwise<T> pw;
  pw.delta.resize(rows * D);
  if (with_grad) pw.delta_grad.resize(rows * D);
  if (v.z) pw.z_sig.resize(rows * D);
  parallel_for(rows, grain_for(D * 8), [&](int64_t r0, int64_t r1) {
    std::vector<T> raw(D), e(D);
    for (int64_t r = r0; r < r1; ++r) {
      const T* __restrict dr = v.delta + r * p.delta_row;
      for (int64_t d = 0; d < D; ++d) raw[d] = dr[d] + (v.dt_bias ? v.dt_bias[d] : T(0));
      for (int64_t d = 0; d < D; ++d) e[d] = std::exp(raw[d]);
      T* __restrict out = pw.delta.data() + r * D;
      for (int64_t d = 0; d < D; ++d) out[d] = raw[d] > T(20) ? raw[d] : std::log1p(e[d]);
      if (with_grad) {
        T* __restrict g = pw.delta_grad.data() + r * D;
        for (int64_t d = 0; d < D; ++d) g[d] = raw[d] > T(20) ? T(1) : e[d] / (T(1) + e[d]);
      }
      if (v.z) {
        const T* __restrict zr = v.z + r * p.z_row;
        T* __restrict zs = pw.z_sig.data() + r * D;
        for (int64_t d = 0; d < D; ++d) zs[d] = T(1) / (T(1) + std::exp(-zr[d]));
      }
    }
  });
  return pw;
}

template <class T>
void scan_fwd(const SelectiveScanParams& p) {
  const ScanView<T> v{p};
  const int64_t N = p.state, D = p.dim, L = p.len;
  const int64_t nblk = (D + kBlock - 1) / kBlock;
  const int64_t nchunks = ssm_num_chunks(L, p.chunk_len);
  T* y = static_cast<T*>(p.y);
  const T* h0 = static_cast<const T*>(p.h0);
  T* h_last = static_cast<T*>(p.h_last);
  T* chunk_states = static_cast<T*>(p.chunk_states);
  const Pointwise<T> pw = pointwise(v, false);
  parallel_for(p.batch * nblk, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> h(kBlock * N), A(kBlock * N), decay(kBlock * N), dlv(kBlock);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / nblk, d0 = (task % nblk) * kBlock, d1 = std::min(D, d0 + kBlock);
      const int64_t nd = d1 - d0;
      for (int64_t i = 0; i < nd; ++i)
        for (int64_t n = 0; n < N; ++n) {
          A[i * N + n] = v.A_at(d0 + i, n);
          h[i * N + n] = h0 ? h0[(b * D + d0 + i) * N + n] : T(0);
        }
      for (int64_t t = 0; t < L; ++t) {
        if (chunk_states && t % p.chunk_len == 0) {
          T* cs = chunk_states + ((b * nchunks + t / p.chunk_len) * D + d0) * N;
          std::copy(h.begin(), h.begin() + nd * N, cs);
        }
        const int64_t r = v.row(b, t);
        const T* Bt = v.B_at(r);
        const T* Ct = v.C_at(r);
        for (int64_t i = 0; i < nd; ++i) {
          dlv[i] = pw.delta[r * D + d0 + i];
          for (int64_t n = 0; n < N; ++n) decay[i * N + n] = dlv[i] * A[i * N + n];
        }
        exp_inplace(decay.data(), nd * N);  // a = exp(delta * A) for the whole block at once
        for (int64_t i = 0; i < nd; ++i) {
          const int64_t d = d0 + i;
          const T ut = v.u_at(r, d);
          const T dlu = dlv[i] * ut;
          T* __restrict hd = h.data() + i * N;
          const T* __restrict ad = decay.data() + i * N;
          T acc = 0;
          for (int64_t n = 0; n < N; ++n) {
            hd[n] = ad[n] * hd[n] + dlu * Bt[n];
            acc += Ct[n] * hd[n];
          }
          acc += v.D_at(d) * ut;
          if (v.z) {
            acc *= v.z_at(r, d) * pw.z_sig[r * D + d];
          }
          y[r * D + d] = acc;
        }
      }
      if (h_last)
        for (int64_t i = 0; i < nd; ++i)
          std::copy(h.begin() + i * N, h.begin() + (i + 1) * N, h_last + (b * D + d0 + i) * N);
    }
  });
}

// One function (about 140 lines) on purpose: it is the reference the CUDA backward is checked
// against, and keeps the passes of kernels/cuda/selective_scan_bwd.cu in one readable sequence.
template <class T>
void scan_bwd(const SelectiveScanBwdParams& q) {
  const SelectiveScanParams& p = q.fwd;
  HYDRA_CHECK(p.chunk_states != nullptr)
      << "selective_scan_bwd needs the chunk states saved by the forward";
  const ScanView<T> v{p};
  // A chunk longer than the sequence is one chunk of the sequence's length (the buffers below).
  const int64_t N = p.state, D = p.dim, L = p.len, Bsz = p.batch, CL = std::min(p.chunk_len, L);
  const int64_t nblk = (D + kBlock - 1) / kBlock;
  const int64_t nchunks = ssm_num_chunks(L, CL);
  const T* chunk_states = static_cast<const T*>(p.chunk_states);
  const T* gy = static_cast<const T*>(q.gy);
  const T* g_hlast = static_cast<const T*>(q.g_hlast);
  T* gu = static_cast<T*>(q.gu);
  T* gdelta = static_cast<T*>(q.gdelta);
  T* gz = static_cast<T*>(q.gz);
  T* gh0 = static_cast<T*>(q.gh0);

  // Partials: gB/gC per channel block; gA/gD/gdt_bias per batch entry.
  std::vector<T> gB_part(nblk * Bsz * L * N, T(0)), gC_part(nblk * Bsz * L * N, T(0));
  std::vector<T> gA_part(Bsz * D * N, T(0)), gD_part(Bsz * D, T(0)), gbias_part(Bsz * D, T(0));

  const Pointwise<T> pw = pointwise(v, true);
  parallel_for(Bsz * nblk, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> A(kBlock * N), G(kBlock * N);
    std::vector<T> hbuf((CL + 1) * kBlock * N), abuf(CL * kBlock * N), dlbuf(CL * kBlock);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / nblk, blk = task % nblk;
      const int64_t d0 = blk * kBlock, d1 = std::min(D, d0 + kBlock), nd = d1 - d0;
      T* gBp = gB_part.data() + (blk * Bsz + b) * L * N;
      T* gCp = gC_part.data() + (blk * Bsz + b) * L * N;
      for (int64_t i = 0; i < nd; ++i)
        for (int64_t n = 0; n < N; ++n) {
          A[i * N + n] = v.A_at(d0 + i, n);
          G[i * N + n] = g_hlast ? g_hlast[(b * D + d0 + i) * N + n] : T(0);
        }
      for (int64_t c = nchunks - 1; c >= 0; --c) {
        const int64_t cs = c * CL, ce = std::min(L, cs + CL);
        // Recompute h and a inside the chunk: hbuf[s] = h before step cs+s, hbuf[s+1] = after it.
        const T* saved = chunk_states + ((b * nchunks + c) * D + d0) * N;
        for (int64_t i = 0; i < nd; ++i)
          std::copy(saved + i * N, saved + (i + 1) * N, hbuf.begin() + i * N);
        for (int64_t t = cs; t < ce; ++t) {
          const int64_t s = t - cs, r = v.row(b, t);
          const T* Bt = v.B_at(r);
          T* as = abuf.data() + s * kBlock * N;
          for (int64_t i = 0; i < nd; ++i) {
            const T dl = pw.delta[r * D + d0 + i];
            dlbuf[s * kBlock + i] = dl;
            for (int64_t n = 0; n < N; ++n) as[i * N + n] = dl * A[i * N + n];
          }
          exp_inplace(as, nd * N);
          for (int64_t i = 0; i < nd; ++i) {
            const T dlu = dlbuf[s * kBlock + i] * v.u_at(r, d0 + i);
            const T* __restrict hp = hbuf.data() + (s * kBlock + i) * N;
            T* __restrict hn = hbuf.data() + ((s + 1) * kBlock + i) * N;
            const T* __restrict an = as + i * N;
            for (int64_t n = 0; n < N; ++n) hn[n] = an[n] * hp[n] + dlu * Bt[n];
          }
        }
        for (int64_t t = ce - 1; t >= cs; --t) {
          const int64_t s = t - cs, r = v.row(b, t);
          const T* Bt = v.B_at(r);
          const T* Ct = v.C_at(r);
          T* gBt = gBp + t * N;
          T* gCt = gCp + t * N;
          for (int64_t i = 0; i < nd; ++i) {
            const int64_t d = d0 + i;
            const T ut = v.u_at(r, d), dl = dlbuf[s * kBlock + i];
            const T* hp = hbuf.data() + (s * kBlock + i) * N;
            const T* hn = hbuf.data() + ((s + 1) * kBlock + i) * N;
            const T* an = abuf.data() + (s * kBlock + i) * N;
            T g = gy[r * D + d];
            if (v.z) {
              T y_pre = v.D_at(d) * ut;
              for (int64_t n = 0; n < N; ++n) y_pre += Ct[n] * hn[n];
              const T zt = v.z_at(r, d), sg = pw.z_sig[r * D + d];
              gz[r * D + d] = g * y_pre * sg * (T(1) + zt * (T(1) - sg));
              g *= zt * sg;
            }
            gD_part[b * D + d] += g * ut;
            T gut = v.D_at(d) * g, gdl = 0;
            T* Gd = G.data() + i * N;
            T* gAd = gA_part.data() + (b * D + d) * N;
            for (int64_t n = 0; n < N; ++n) {
              const T Gn = Gd[n] + Ct[n] * g;
              gCt[n] += g * hn[n];
              gut += Gn * dl * Bt[n];
              gBt[n] += Gn * dl * ut;
              const T dadl = A[i * N + n] * an[n] * hp[n];
              gdl += Gn * (dadl + Bt[n] * ut);
              gAd[n] += Gn * dl * an[n] * hp[n];
              Gd[n] = an[n] * Gn;
            }
            gu[r * D + d] = gut;
            const T graw = gdl * pw.delta_grad[r * D + d];
            gdelta[r * D + d] = graw;
            gbias_part[b * D + d] += graw;
          }
        }
      }
      if (gh0)
        for (int64_t i = 0; i < nd; ++i)
          std::copy(G.begin() + i * N, G.begin() + (i + 1) * N, gh0 + (b * D + d0 + i) * N);
    }
  });

  T* gB = static_cast<T*>(q.gB);
  T* gC = static_cast<T*>(q.gC);
  parallel_for(Bsz * L, grain_for(N * nblk), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t n = 0; n < N; ++n) {
        T sb = 0, sc = 0;
        for (int64_t blk = 0; blk < nblk; ++blk) {
          sb += gB_part[(blk * Bsz * L + r) * N + n];
          sc += gC_part[(blk * Bsz * L + r) * N + n];
        }
        gB[r * N + n] = sb;
        gC[r * N + n] = sc;
      }
  });
  T* gA_log = static_cast<T*>(q.gA_log);
  T* gD = static_cast<T*>(q.gD);
  T* gdt_bias = static_cast<T*>(q.gdt_bias);
  for (int64_t d = 0; d < D; ++d) {
    for (int64_t n = 0; n < N; ++n) {
      T s = 0;
      for (int64_t b = 0; b < Bsz; ++b) s += gA_part[(b * D + d) * N + n];
      gA_log[d * N + n] = s * v.A_at(d, n);  // dA/dA_log = A
    }
    T sd = 0, sbias = 0;
    for (int64_t b = 0; b < Bsz; ++b) {
      sd += gD_part[b * D + d];
      sbias += gbias_part[b * D + d];
    }
    if (gD) gD[d] = sd;
    if (gdt_bias) gdt_bias[d] = sbias;
  }
}

}  // namespace

void selective_scan_fwd(const SelectiveScanParams& p) {
  dispatch_float(p.dtype, "selective_scan",
                 [&](auto tag) { scan_fwd<typename decltype(tag)::type>(p); });
}

void selective_scan_bwd(const SelectiveScanBwdParams& p) {
  dispatch_float(p.fwd.dtype, "selective_scan_backward",
                 [&](auto tag) { scan_bwd<typename decltype(tag)::type>(p); });
}

}  // namespace hydra::kernels::cpu
