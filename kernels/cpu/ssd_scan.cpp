// CPU SSD scan (kernels/ssd_scan.h), in the CUDA kernels' three phases so that both compute the
// same sums. Per batch b and chunk c of q <= Q steps, head h (its channels p < P), with
// cs_t = sum_{i <= t} dl_i A the chunk's cumulative log-decay and T = cs_{q-1}:
//   forward   S_c = sum_s exp(T - cs_s) dl_s B_s x_s^T                     (the chunk from zero)
//             H_0 = h0, H_{c+1} = exp(T_c) H_c + S_c                         (between chunks)
//             y_t = sum_{s <= t} exp(cs_t - cs_s) (C_t . B_s) dl_s x_s + exp(cs_t) H_c^T C_t
//   backward  E_c = dL/dH_{c+1} (the gradient on chunk c's end state): E_{nc-1} = g_hlast,
//             E_{c-1} = exp(T_c) E_c + sum_t exp(cs_t) C_t gy_t^T, gh0 = E_{-1};
//             then per chunk, with xd_s = dl_s x_s, W_ts = exp(cs_t - cs_s), G_ts = C_t . B_s,
//             M = W o G and gM_ts = gy_t . xd_s (s <= t):
//               g xd_s = sum_{t >= s} M_ts gy_t + exp(T - cs_s) E B_s
//               gC_t   = sum_s W_ts gM_ts B_s + exp(cs_t) H_c gy_t
//               gB_s   = sum_t W_ts gM_ts C_t + exp(T - cs_s) E xd_s
//               g cs_t = sum_s M_ts gM_ts - sum_t' M_t't gM_t't + exp(cs_t) C_t . H_c gy_t
//                        - exp(T - cs_t) B_t . E xd_t,  and g T += <E, H_{c+1}> (the last step)
//             and dl, A from cs by a reverse cumulative sum: g a_t = sum_{t' >= t} g cs_t',
//             g dl_t = x_t . g xd_t + A g a_t, gA = sum_t dl_t g a_t.
// The skip term and the gate: the output is (y_t + D x_t) SiLU(z_t) (`pre` keeps what enters the
// gate); the backward first turns the output's gradient into y's (gy SiLU(z)) and takes gz and gD.
// Tasks are (batch, chunk) with the heads inside (gB and gC sum over heads) or (batch, head) for
// the passes between chunks; gA goes through per-task partials summed in a fixed order.
#include "kernels/ssd_scan.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/base/parallel.h"
#include "kernels/cpu/common.h"

namespace hydra::kernels::cpu {
namespace {

template <class T>
struct SsdView {
  const SsdScanParams& p;
  int64_t Bz = p.batch, L = p.len, H = p.heads, P = p.head_dim, N = p.state, Q = p.chunk_len;
  int64_t nc = ssd_num_chunks(L, Q), Dm = H * P;
  const T* x = static_cast<const T*>(p.x);
  const T* dl = static_cast<const T*>(p.dl);
  const T* A = static_cast<const T*>(p.A);
  const T* Bm = static_cast<const T*>(p.B);
  const T* Cm = static_cast<const T*>(p.C);
  const T* Dskip = static_cast<const T*>(p.D);
  const T* z = static_cast<const T*>(p.z);
  T* states = static_cast<T*>(p.states);

  int64_t row(int64_t b, int64_t t) const { return b * L + t; }
  const T* x_at(int64_t b, int64_t t, int64_t h) const { return x + row(b, t) * p.x_row + h * P; }
  const T* z_at(int64_t b, int64_t t, int64_t h) const { return z + row(b, t) * p.z_row + h * P; }
  T dl_at(int64_t b, int64_t t, int64_t h) const { return dl[row(b, t) * H + h]; }
  const T* B_at(int64_t b, int64_t t) const { return Bm + row(b, t) * p.B_row; }
  const T* C_at(int64_t b, int64_t t) const { return Cm + row(b, t) * p.C_row; }
  // [N, P] blocks of [B, H, nc, N, P] buffers
  int64_t block(int64_t b, int64_t h, int64_t c) const { return ((b * H + h) * nc + c) * N * P; }
  int64_t len_of(int64_t c) const { return std::min(Q, L - c * Q); }
  // A (sequence, head)'s [N, P] state from the [B, H P, N] layout of h0 and h_last (zeros from
  // null), and back.
  void state_in(const T* src, int64_t b, int64_t h, T* dst) const {
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = 0; j < P; ++j) dst[n * P + j] = src ? src[(b * Dm + h * P + j) * N + n] : 0;
  }
  void state_out(const T* src, int64_t b, int64_t h, T* dst) const {
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = 0; j < P; ++j) dst[(b * Dm + h * P + j) * N + n] = src[n * P + j];
  }
  // cs for head h of chunk c of sequence b, into cs[0 .. q)
  void cumulative(int64_t b, int64_t c, int64_t h, T* cs) const {
    T run = 0;
    for (int64_t t = 0; t < len_of(c); ++t) cs[t] = run += dl_at(b, c * Q + t, h) * A[h];
  }
};

template <class T>
void fwd(const SsdScanParams& p) {
  const SsdView<T> v{p};
  const int64_t Bz = v.Bz, H = v.H, P = v.P, N = v.N, Q = v.Q, nc = v.nc;
  std::vector<T> total(Bz * H * nc);
  // 1: each chunk's state from zero, into `states`
  parallel_for(Bz * nc, 1, [&](int64_t i0, int64_t i1) {
    std::vector<T> cs(Q);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / nc, c = i % nc, q = v.len_of(c);
      for (int64_t h = 0; h < H; ++h) {
        v.cumulative(b, c, h, cs.data());
        total[(b * H + h) * nc + c] = cs[q - 1];
        T* S = v.states + v.block(b, h, c);
        std::fill(S, S + N * P, T(0));
        for (int64_t s = 0; s < q; ++s) {
          const int64_t t = c * Q + s;
          const T w = std::exp(cs[q - 1] - cs[s]) * v.dl_at(b, t, h);
          const T* xs = v.x_at(b, t, h);
          const T* Bs = v.B_at(b, t);
          for (int64_t n = 0; n < N; ++n) {
            const T bw = Bs[n] * w;
            for (int64_t j = 0; j < P; ++j) S[n * P + j] += bw * xs[j];
          }
        }
      }
    }
  });
  // 2: the states between chunks; `states` becomes the state entering each chunk
  const T* h0 = static_cast<const T*>(p.h0);
  T* h_last = static_cast<T*>(p.h_last);
  parallel_for(Bz * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<T> cur(N * P), tmp(N * P);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H;
      v.state_in(h0, b, h, cur.data());
      for (int64_t c = 0; c < nc; ++c) {
        T* S = v.states + v.block(b, h, c);
        const T e = std::exp(total[i * nc + c]);
        std::copy(S, S + N * P, tmp.begin());
        std::copy(cur.begin(), cur.end(), S);
        for (int64_t k = 0; k < N * P; ++k) cur[k] = e * cur[k] + tmp[k];
      }
      v.state_out(cur.data(), b, h, h_last);
    }
  });
  // 3: the outputs
  T* y = static_cast<T*>(p.y);
  parallel_for(Bz * nc, 1, [&](int64_t i0, int64_t i1) {
    std::vector<T> cs(Q), G(Q * Q);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / nc, c = i % nc, q = v.len_of(c);
      for (int64_t t = 0; t < q; ++t)
        for (int64_t s = 0; s <= t; ++s) {
          T g = 0;
          for (int64_t n = 0; n < N; ++n) g += v.C_at(b, c * Q + t)[n] * v.B_at(b, c * Q + s)[n];
          G[t * Q + s] = g;
        }
      for (int64_t h = 0; h < H; ++h) {
        v.cumulative(b, c, h, cs.data());
        const T* Hin = v.states + v.block(b, h, c);
        for (int64_t t = 0; t < q; ++t) {
          T* yt = y + v.row(b, c * Q + t) * v.Dm + h * P;
          const T* Ct = v.C_at(b, c * Q + t);
          const T et = std::exp(cs[t]);
          for (int64_t j = 0; j < P; ++j) {
            T off = 0;
            for (int64_t n = 0; n < N; ++n) off += Ct[n] * Hin[n * P + j];
            yt[j] = et * off;
          }
          for (int64_t s = 0; s <= t; ++s) {
            const T m = G[t * Q + s] * std::exp(cs[t] - cs[s]) * v.dl_at(b, c * Q + s, h);
            const T* xs = v.x_at(b, c * Q + s, h);
            for (int64_t j = 0; j < P; ++j) yt[j] += m * xs[j];
          }
          const T* xt = v.x_at(b, c * Q + t, h);
          for (int64_t j = 0; j < P; ++j) {
            const T pre = yt[j] + (v.Dskip ? v.Dskip[h * P + j] * xt[j] : T(0));
            if (p.pre) static_cast<T*>(p.pre)[v.row(b, c * Q + t) * v.Dm + h * P + j] = pre;
            if (v.z) {
              const T zt = v.z_at(b, c * Q + t, h)[j];
              yt[j] = pre * zt * sigmoid(zt);
            } else {
              yt[j] = pre;
            }
          }
        }
      }
    }
  });
}

template <class T>
void bwd(const SsdScanBwdParams& q) {
  const SsdScanParams& p = q.fwd;
  const SsdView<T> v{p};
  const int64_t Bz = v.Bz, H = v.H, P = v.P, N = v.N, Q = v.Q, nc = v.nc, Dm = v.Dm;
  // y's gradient before the gate (gy SiLU(z)), gz = gy pre SiLU'(z), and gD = sum x gy SiLU(z)
  const T* g_out = static_cast<const T*>(q.gy);
  std::vector<T> gcore;
  const T* gy = g_out;
  if (v.z) {
    gcore.resize(Bz * v.L * Dm);
    const T* pre = static_cast<const T*>(p.pre);
    HYDRA_CHECK(pre != nullptr) << "ssd_scan backward: the forward kept no pre-gate output";
    T* gz = static_cast<T*>(q.gz);
    parallel_for(Bz * v.L, grain_for(Dm * 8), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t k = 0; k < Dm; ++k) {
          const T zt = v.z[r * p.z_row + k], sg = sigmoid(zt), g = g_out[r * Dm + k];
          gcore[r * Dm + k] = g * zt * sg;
          if (gz) gz[r * Dm + k] = g * pre[r * Dm + k] * sg * (T(1) + zt * (T(1) - sg));
        }
    });
    gy = gcore.data();
  }
  if (q.gD) {
    T* gD = static_cast<T*>(q.gD);
    parallel_for(Dm, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        T sum = 0;
        for (int64_t r = 0; r < Bz * v.L; ++r) sum += gy[r * Dm + k] * v.x[r * p.x_row + k];
        gD[k] = sum;
      }
    });
  }
  auto gy_at = [&](int64_t b, int64_t t, int64_t h) { return gy + v.row(b, t) * Dm + h * P; };
  std::vector<T> E(Bz * H * nc * N * P), total(Bz * H * nc), gT(Bz * H * nc);
  // 1: U_c = sum_t exp(cs_t) C_t gy_t^T, into E
  parallel_for(Bz * nc, 1, [&](int64_t i0, int64_t i1) {
    std::vector<T> cs(Q);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / nc, c = i % nc, len = v.len_of(c);
      for (int64_t h = 0; h < H; ++h) {
        v.cumulative(b, c, h, cs.data());
        total[(b * H + h) * nc + c] = cs[len - 1];
        T* U = E.data() + v.block(b, h, c);
        std::fill(U, U + N * P, T(0));
        for (int64_t t = 0; t < len; ++t) {
          const T et = std::exp(cs[t]);
          const T* Ct = v.C_at(b, c * Q + t);
          const T* g = gy_at(b, c * Q + t, h);
          for (int64_t n = 0; n < N; ++n)
            for (int64_t j = 0; j < P; ++j) U[n * P + j] += et * Ct[n] * g[j];
        }
      }
    }
  });
  // 2: the end states' gradients, last chunk to first; E_c replaces U_c
  const T* g_hlast = static_cast<const T*>(q.g_hlast);
  T* gh0 = static_cast<T*>(q.gh0);
  parallel_for(Bz * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<T> g(N * P), u(N * P);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H;
      v.state_in(g_hlast, b, h, g.data());
      for (int64_t c = nc - 1; c >= 0; --c) {
        T* Ec = E.data() + v.block(b, h, c);
        const T* Hin = v.states + v.block(b, h, c);
        const T e = std::exp(total[i * nc + c]);
        std::copy(Ec, Ec + N * P, u.begin());
        std::copy(g.begin(), g.end(), Ec);
        T dot = 0;
        for (int64_t k = 0; k < N * P; ++k) dot += g[k] * Hin[k];
        gT[i * nc + c] = e * dot;
        for (int64_t k = 0; k < N * P; ++k) g[k] = e * g[k] + u[k];
      }
      if (gh0) v.state_out(g.data(), b, h, gh0);
    }
  });
  // 3: each chunk's gradients
  T* gx = static_cast<T*>(q.gx);
  T* gdl = static_cast<T*>(q.gdl);
  T* gB = static_cast<T*>(q.gB);
  T* gC = static_cast<T*>(q.gC);
  std::vector<T> gA_part(Bz * nc * H);
  parallel_for(Bz * nc, 1, [&](int64_t i0, int64_t i1) {
    std::vector<T> cs(Q), G(Q * Q), gG(Q * Q), gCa(Q * N), gBa(Q * N), xd(Q * P), gxd(Q * P),
        gcs(Q), HG(N), EX(N);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / nc, c = i % nc, len = v.len_of(c), t0 = c * Q;
      for (int64_t t = 0; t < len; ++t)
        for (int64_t s = 0; s <= t; ++s) {
          T g = 0;
          for (int64_t n = 0; n < N; ++n) g += v.C_at(b, t0 + t)[n] * v.B_at(b, t0 + s)[n];
          G[t * Q + s] = g;
          gG[t * Q + s] = 0;
        }
      std::fill(gCa.begin(), gCa.end(), T(0));
      std::fill(gBa.begin(), gBa.end(), T(0));
      for (int64_t h = 0; h < H; ++h) {
        v.cumulative(b, c, h, cs.data());
        const T last = cs[len - 1];
        const T* Hin = v.states + v.block(b, h, c);
        const T* Ec = E.data() + v.block(b, h, c);
        for (int64_t s = 0; s < len; ++s) {
          const T d = v.dl_at(b, t0 + s, h);
          const T* xs = v.x_at(b, t0 + s, h);
          for (int64_t j = 0; j < P; ++j) xd[s * P + j] = d * xs[j];
        }
        std::fill(gxd.begin(), gxd.end(), T(0));
        std::fill(gcs.begin(), gcs.end(), T(0));
        for (int64_t t = 0; t < len; ++t) {
          const T* g = gy_at(b, t0 + t, h);
          for (int64_t s = 0; s <= t; ++s) {
            T gm = 0;
            for (int64_t j = 0; j < P; ++j) gm += g[j] * xd[s * P + j];
            const T w = std::exp(cs[t] - cs[s]), m = w * G[t * Q + s], r = m * gm;
            gcs[t] += r;
            gcs[s] -= r;
            gG[t * Q + s] += w * gm;
            for (int64_t j = 0; j < P; ++j) gxd[s * P + j] += m * g[j];
          }
          // the entering state's part: exp(cs_t) H^T C_t
          const T et = std::exp(cs[t]);
          const T* Ct = v.C_at(b, t0 + t);
          T dot = 0;
          for (int64_t n = 0; n < N; ++n) {
            T hg = 0;
            for (int64_t j = 0; j < P; ++j) hg += Hin[n * P + j] * g[j];
            gCa[t * N + n] += et * hg;
            dot += Ct[n] * hg;
          }
          gcs[t] += et * dot;
        }
        // the end state's part: exp(T - cs_s) B_s xd_s^T
        for (int64_t s = 0; s < len; ++s) {
          const T e2 = std::exp(last - cs[s]);
          const T* Bs = v.B_at(b, t0 + s);
          T dot = 0;
          for (int64_t n = 0; n < N; ++n) {
            T ex = 0;
            for (int64_t j = 0; j < P; ++j) ex += Ec[n * P + j] * xd[s * P + j];
            gBa[s * N + n] += e2 * ex;
            dot += Bs[n] * ex;
            for (int64_t j = 0; j < P; ++j) gxd[s * P + j] += e2 * Bs[n] * Ec[n * P + j];
          }
          gcs[s] -= e2 * dot;
          gcs[len - 1] += e2 * dot;
        }
        gcs[len - 1] += gT[(b * H + h) * nc + c];
        T run = 0, ga_sum = 0;
        for (int64_t t = len - 1; t >= 0; --t) {
          run += gcs[t];  // g a_t
          const T d = v.dl_at(b, t0 + t, h);
          const T* xt = v.x_at(b, t0 + t, h);
          T* gxt = gx + v.row(b, t0 + t) * Dm + h * P;
          T gd = 0;
          const T* gt = gy_at(b, t0 + t, h);
          for (int64_t j = 0; j < P; ++j) {
            gxt[j] = d * gxd[t * P + j] + (v.Dskip ? v.Dskip[h * P + j] * gt[j] : T(0));
            gd += xt[j] * gxd[t * P + j];
          }
          gdl[v.row(b, t0 + t) * H + h] = gd + v.A[h] * run;
          ga_sum += d * run;
        }
        gA_part[i * H + h] = ga_sum;
      }
      for (int64_t t = 0; t < len; ++t) {
        T* gCt = gC + v.row(b, t0 + t) * N;
        T* gBt = gB + v.row(b, t0 + t) * N;
        for (int64_t n = 0; n < N; ++n) {
          T sc = gCa[t * N + n], sb = gBa[t * N + n];
          for (int64_t s = 0; s <= t; ++s) sc += gG[t * Q + s] * v.B_at(b, t0 + s)[n];
          for (int64_t u = t; u < len; ++u) sb += gG[u * Q + t] * v.C_at(b, t0 + u)[n];
          gCt[n] = sc;
          gBt[n] = sb;
        }
      }
    }
  });
  T* gA = static_cast<T*>(q.gA);
  for (int64_t h = 0; h < H; ++h) {
    T sum = 0;
    for (int64_t i = 0; i < Bz * nc; ++i) sum += gA_part[i * H + h];
    gA[h] = sum;
  }
}

}  // namespace

void ssd_scan_fwd(const SsdScanParams& p) {
  if (p.batch * p.len * p.heads == 0) return;
  dispatch_float(p.dtype, "ssd_scan", [&](auto tag) { fwd<typename decltype(tag)::type>(p); });
}

void ssd_scan_bwd(const SsdScanBwdParams& q) {
  if (q.fwd.batch * q.fwd.len * q.fwd.heads == 0) return;
  dispatch_float(q.fwd.dtype, "ssd_scan_backward",
                 [&](auto tag) { bwd<typename decltype(tag)::type>(q); });
}

}  // namespace hydra::kernels::cpu
