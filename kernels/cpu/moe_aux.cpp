#include "kernels/moe_aux.h"

#include <cmath>
#include <vector>

#include "kernels/cpu/common.h"

namespace hydra::kernels::cpu {
namespace {

constexpr double kEps = 1e-5;  // the normalisers' and log(1 - p)'s, as the composed ops

// The row (b, t)'s normalisers and its balance and locality terms (kernels/moe_aux.h).
template <class T>
struct Rows {
  const MoeAuxParams& p;
  const T *raw, *s, *r, *load, *zn;
  int64_t E;
  explicit Rows(const MoeAuxParams& q)
      : p(q),
        raw(static_cast<const T*>(q.raw)),
        s(static_cast<const T*>(q.s)),
        r(static_cast<const T*>(q.r)),
        load(static_cast<const T*>(q.load)),
        zn(static_cast<const T*>(q.z_next)),
        E(q.experts) {}
  double sum_of(const T* v, int64_t row) const {
    double acc = 0;
    for (int64_t e = 0; e < E; ++e) acc += double(v[row * E + e]);
    return acc + kEps;
  }
  // The group (b, g, e)'s sum over its chunks of log(1 - p + eps), inv_s[row] = 1 / (sum_e s +
  // eps).
  double group_log_sum(const std::vector<double>& inv_s, int64_t b, int64_t g, int64_t e) const {
    double lq = 0;
    for (int64_t t = g * p.group; t < (g + 1) * p.group; ++t) {
      const int64_t row = b * p.chunks + t;
      lq += std::log(1.0 - double(s[row * E + e]) * inv_s[row] + kEps);
    }
    return lq;
  }
  // The detached target of (b, t, e)'s locality pair; false when it has none (the last chunk of the
  // last shard).
  bool target(int64_t b, int64_t t, int64_t e, double* y) const {
    if (t + 1 < p.chunks) {
      *y = sigmoid(p.alpha * double(raw[(b * p.chunks + t + 1) * E + e]));
      return true;
    }
    if (zn == nullptr) return false;
    *y = sigmoid(double(zn[b * E + e]));
    return true;
  }
};

template <class T>
void fwd_impl(const MoeAuxParams& p) {
  const Rows<T> rw(p);
  const int64_t B = p.batch, nC = p.chunks, E = p.experts, ng = nC / p.group;
  double balance = 0, locality = 0, sparsity = 0;
  std::vector<double> inv_s(B * nC);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < nC; ++t) {
      const int64_t row = b * nC + t;
      const double sr = rw.sum_of(rw.r, row);
      inv_s[row] = 1.0 / rw.sum_of(rw.s, row);
      for (int64_t e = 0; e < E; ++e) {
        balance += double(rw.r[row * E + e]) / sr * double(rw.load[e]);
        const double z = p.alpha * double(rw.raw[row * E + e]);
        double y = 0;
        if (rw.target(b, t, e, &y)) locality += softplus(z) - z * y;
        if (p.chunk_len > 1) locality += double(p.chunk_len - 1) * (softplus(z) - z * sigmoid(z));
      }
    }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < ng; ++g)
      for (int64_t e = 0; e < E; ++e)
        sparsity += 1.0 - std::exp(double(p.chunk_len) * rw.group_log_sum(inv_s, b, g, e));
  const double losses[3] = {balance * p.balance_scale, locality * p.locality_scale,
                            sparsity * p.sparsity_scale};
  T* out = static_cast<T*>(p.out);
  for (int k = 0; k < 3; ++k) {
    out[k] = static_cast<T>(losses[k] * p.weights[k]);
    out[3 + k] = static_cast<T>(losses[k]);
  }
}

template <class T>
void bwd_impl(const MoeAuxBwdParams& q) {
  const MoeAuxParams& p = q.fwd;
  const Rows<T> rw(p);
  const int64_t B = p.batch, nC = p.chunks, E = p.experts, ng = nC / p.group;
  const T* go = static_cast<const T*>(q.gout);
  double g[3];
  for (int k = 0; k < 3; ++k) g[k] = double(go[k]) * p.weights[k] + double(go[3 + k]);
  const double gb = g[0] * p.balance_scale, gl = g[1] * p.locality_scale * p.alpha,
               gsp = g[2] * p.sparsity_scale;
  T* graw = static_cast<T*>(q.graw);
  T* gs = static_cast<T*>(q.gs);
  T* gr = static_cast<T*>(q.gr);
  std::vector<double> inv_s(B * nC), coef(B * std::max<int64_t>(ng, 1) * E, 0.0);
  for (int64_t row = 0; row < B * nC; ++row) inv_s[row] = 1.0 / rw.sum_of(rw.s, row);
  // d sparsity / d p[b,t,e] = chunk_len N[b,g,e] / (1 - p + eps), N the group's exp(...).
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g0 = 0; g0 < ng; ++g0)
      for (int64_t e = 0; e < E; ++e)
        coef[(b * ng + g0) * E + e] =
            gsp * double(p.chunk_len) *
            std::exp(double(p.chunk_len) * rw.group_log_sum(inv_s, b, g0, e));
  std::vector<double> G(E);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < nC; ++t) {
      const int64_t row = b * nC + t;
      const double sr = rw.sum_of(rw.r, row);
      double qload = 0, gp = 0;
      for (int64_t e = 0; e < E; ++e) qload += double(rw.r[row * E + e]) / sr * double(rw.load[e]);
      const bool grouped = t < ng * p.group;
      for (int64_t e = 0; e < E; ++e) {
        const double pe = double(rw.s[row * E + e]) * inv_s[row];
        G[e] = grouped ? coef[(b * ng + t / p.group) * E + e] / (1.0 - pe + kEps) : 0.0;
        gp += G[e] * pe;
      }
      for (int64_t e = 0; e < E; ++e) {
        const int64_t i = row * E + e;
        gr[i] = static_cast<T>(gb / sr * (double(rw.load[e]) - qload));
        gs[i] = static_cast<T>((G[e] - gp) * inv_s[row]);
        double y = 0;
        graw[i] = static_cast<T>(
            rw.target(b, t, e, &y) ? gl * (sigmoid(p.alpha * double(rw.raw[i])) - y) : 0.0);
      }
    }
}

}  // namespace

void moe_aux_fwd(const MoeAuxParams& p) {
  dispatch_float(p.dtype, "moe_aux", [&](auto tag) { fwd_impl<typename decltype(tag)::type>(p); });
}

void moe_aux_bwd(const MoeAuxBwdParams& q) {
  dispatch_float(q.fwd.dtype, "moe_aux_backward",
                 [&](auto tag) { bwd_impl<typename decltype(tag)::type>(q); });
}

}  // namespace hydra::kernels::cpu
