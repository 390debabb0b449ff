#include "parallel/sequence.h"

#include <cmath>
#include <limits>

#include "autograd/grad_mode.h"
#include "autograd/node.h"
#include "parallel/collectives.h"

namespace hydra::parallel {

namespace {

// Ties the collectives recorded inside one of these functions to its output, so that their backward
// runs on every rank although some rank does not use what it received (rank 0 never uses the prefix
// it gathered), without relying on the caller to anchor them at the loss (autograd/node.h).
class OwnCollectives {
 public:
  OwnCollectives() : outer_(take_collective_outputs()) {}
  ~OwnCollectives() {
    std::vector<Tensor> left = take_collective_outputs();
    put_collective_outputs(std::move(outer_));
    put_collective_outputs(std::move(left));
  }
  OwnCollectives(const OwnCollectives&) = delete;
  OwnCollectives& operator=(const OwnCollectives&) = delete;
  Tensor anchor(const Tensor& y) { return anchor_collectives(y, take_collective_outputs()); }

 private:
  std::vector<Tensor> outer_;
};

}  // namespace

Tensor conv_halo(const Tensor& x, int64_t width, Communicator& sp) {
  const int64_t B = x.size(0), L = x.size(1), C = x.size(2), h = width - 1;
  if (h <= 0) return Tensor();
  HYDRA_CHECK(L >= h) << "sequence parallelism: a shard of " << L
                      << " tokens is shorter than the convolution's " << h
                      << "-token halo; use fewer sequence-parallel ranks or longer sequences";
  (void)B;
  (void)C;
  return shift_from_previous(x.narrow(1, L - h, h), sp);
}

namespace {

// Both forms of the split scan. scan(D, z, h0) scans this shard (D, z undefined: the summary's
// scan from zero); decay [B, D, N] is the product of the shard's decays per channel and state.
template <class Scan>
SelectiveScanResult split_scan(Communicator& sp, const Tensor& D, const Tensor& z, const Tensor& h0,
                               const Tensor& decay, Scan&& scan) {
  OwnCollectives own;
  // 1. This shard's summary: E (final state from zero) and P (its decays).
  const Tensor E = scan(Tensor(), Tensor(), Tensor()).h_last;  // [B, D, N], accumulate dtype
  const Tensor P = decay.to(E.dtype());
  // 2. Every rank's summary, then this rank's initial state by the prefix H_{j+1} = P_j H_j + E_j.
  const Tensor pairs =
      all_gather(concat({P.unsqueeze(0), E.unsqueeze(0)}, 0).unsqueeze(0), sp);  // [R, 2, B, D, N]
  Tensor H = h0;
  for (int j = 0; j < sp.rank(); ++j) {
    const Tensor Pj = pairs.select(0, j).select(0, 0), Ej = pairs.select(0, j).select(0, 1);
    H = H.defined() ? add(mul(Pj, H), Ej) : Ej;
  }
  // 3. The exact scan from the true initial state.
  SelectiveScanResult out = scan(D, z, H);
  out.y = own.anchor(out.y);
  return out;
}

}  // namespace

SelectiveScanResult selective_scan(Communicator& sp, const Tensor& u, const Tensor& delta_raw,
                                   const Tensor& A_log, const Tensor& B, const Tensor& C,
                                   const Tensor& D, const Tensor& dt_bias, const Tensor& z,
                                   const Tensor& h0, int64_t chunk_len) {
  if (sp.size() == 1)
    return hydra::selective_scan(u, delta_raw, A_log, B, C, D, dt_bias, z, h0, chunk_len);
  // P = prod_t a_t = exp(A * sum_t delta_t), [B, D, N].
  const Tensor delta =
      softplus(dt_bias.defined() ? add(delta_raw, dt_bias) : delta_raw);  // [B, L, D]
  const Tensor decay = exp(mul(sum(delta, {1}).unsqueeze(2), neg(exp(A_log)).unsqueeze(0)));
  return split_scan(sp, D, z, h0, decay, [&](const Tensor& Dv, const Tensor& zv, const Tensor& hv) {
    return hydra::selective_scan(u, delta_raw, A_log, B, C, Dv, dt_bias, zv, hv, chunk_len);
  });
}

SelectiveScanResult ssd_scan(Communicator& sp, const Tensor& u, const Tensor& delta_raw,
                             const Tensor& A_log, const Tensor& B, const Tensor& C, const Tensor& D,
                             const Tensor& dt_bias, const Tensor& z, const Tensor& h0,
                             int64_t chunk_len) {
  if (sp.size() == 1)
    return hydra::ssd_scan(u, delta_raw, A_log, B, C, D, dt_bias, z, h0, chunk_len);
  const int64_t Bsz = u.size(0), Dm = u.size(2), H = A_log.size(0), N = B.size(2);
  const DType acc = accumulate_dtype(u.dtype());
  // P = exp(A_h * sum_t delta_t[h]) per head, repeated over its channels and the states.
  Tensor delta = delta_raw.to(acc);
  if (dt_bias.defined()) delta = add(delta, dt_bias.to(acc));
  const Tensor per_head = exp(mul(sum(softplus(delta), {1}), neg(exp(A_log.to(acc)))));  // [B, H]
  const Tensor decay =
      per_head.view({Bsz, H, 1, 1}).expand({Bsz, H, Dm / H, N}).reshape({Bsz, Dm, N});
  return split_scan(sp, D, z, h0, decay, [&](const Tensor& Dv, const Tensor& zv, const Tensor& hv) {
    return hydra::ssd_scan(u, delta_raw, A_log, B, C, Dv, dt_bias, zv, hv, chunk_len);
  });
}

// ---- merging partial attentions
// -------------------------------------------------------------------

std::pair<Tensor, Tensor> merge_attention(const std::vector<Tensor>& outs_in,
                                          const std::vector<Tensor>& lses_in,
                                          const std::vector<std::vector<uint8_t>>& excluded) {
  HYDRA_CHECK(!outs_in.empty() && outs_in.size() == lses_in.size())
      << "merge_attention: parts differ in count";
  HYDRA_CHECK(excluded.size() <= outs_in.size())
      << "merge_attention: " << excluded.size() << " masks for " << outs_in.size() << " parts";
  const Tensor& o0 = outs_in[0];
  HYDRA_CHECK(o0.dim() == 4) << "merge_attention: parts must be [B, L, H, dh], got "
                             << shape_str(o0.shape());
  const int64_t B = o0.size(0), L = o0.size(1), H = o0.size(2);
  std::vector<Tensor> outs, lses;
  for (std::size_t i = 0; i < outs_in.size(); ++i) {
    HYDRA_CHECK(outs_in[i].shape() == o0.shape() && lses_in[i].shape() == Shape({B, H, L}))
        << "merge_attention: part " << i << " has shapes " << shape_str(outs_in[i].shape())
        << " and " << shape_str(lses_in[i].shape()) << ", part 0 " << shape_str(o0.shape());
    Tensor lse = lses_in[i];
    if (i < excluded.size() && !excluded[i].empty()) {
      // A dropped part weighs exp(-inf) = 0 for those queries (and gets no gradient there).
      HYDRA_CHECK(static_cast<int64_t>(excluded[i].size()) == L)
          << "merge_attention: part " << i << "'s mask has " << excluded[i].size()
          << " entries for " << L << " queries";
      std::vector<double> mask(L);
      for (int64_t l = 0; l < L; ++l)
        mask[l] = excluded[i][l] ? -std::numeric_limits<double>::infinity() : 0.0;
      lse = add(lse, tensor(mask, {1, 1, L}, lse.device()).to(lse.dtype()));
    }
    outs.push_back(outs_in[i].unsqueeze(0));
    lses.push_back(lse.unsqueeze(0));
  }
  return hydra::merge_attention(concat(outs, 0), concat(lses, 0));
}

// ---- sparse attention over a split sequence
// -------------------------------------------------------

namespace {

// Positions p in [lo, hi) with p % stride == 0.
std::vector<int64_t> globals_in(int64_t lo, int64_t hi, int64_t stride) {
  std::vector<int64_t> out;
  for (int64_t p = (lo + stride - 1) / stride * stride; p < hi; p += stride) out.push_back(p);
  return out;
}

// Rows `rows` (positions within the shard) of x [B, L, H, dh] along axis 1, padded with zero rows
// to `count`: [B, count, H, dh].
Tensor take_rows(const Tensor& x, const std::vector<int64_t>& rows, int64_t count) {
  const int64_t B = x.size(0), H = x.size(2), dh = x.size(3);
  std::vector<Tensor> parts;
  parts.reserve(rows.size());
  for (int64_t r : rows) parts.push_back(x.narrow(1, r, 1));
  if (static_cast<int64_t>(rows.size()) < count)
    parts.push_back(
        zeros({B, count - static_cast<int64_t>(rows.size()), H, dh}, x.dtype(), x.device()));
  return parts.size() == 1 ? parts[0] : concat(parts, 1);
}

}  // namespace

// One function (about 130 lines): its parts A to D share the shard's geometry and add to the one
// list of partial results that the merge at the end combines; each part is commented where it
// starts.
Tensor sparse_attention(Communicator& sp, const Tensor& q, const Tensor& k, const Tensor& v,
                        const AttentionPattern& pattern, double scale, int64_t pos0) {
  const int R = sp.size(), r = sp.rank();
  if (R == 1) return hydra::sparse_attention(q, k, v, pattern, scale, pos0, pos0);
  OwnCollectives own;
  const int64_t B = q.size(0), Lr = q.size(1), H = q.size(2), dh = q.size(3);
  const int64_t W = pattern.window, G = pattern.global_stride;
  HYDRA_CHECK(pos0 == int64_t(r) * Lr)
      << "sequence-parallel attention: shard " << r << " of " << Lr << " tokens starts at position "
      << pos0 << ", expected " << r * Lr;
  const DType acc = accumulate_dtype(q.dtype());
  std::vector<Tensor> outs, lses;
  std::vector<std::vector<uint8_t>> excluded;
  auto add_part = [&](const std::pair<Tensor, Tensor>& part, std::vector<uint8_t> drop = {}) {
    outs.push_back(part.first);
    lses.push_back(part.second);
    excluded.push_back(std::move(drop));
  };
  // A. The shard's own keys.
  add_part(sparse_attention_with_lse(q, k, v, pattern, scale, pos0, pos0));

  // B. The keys before the shard that the pattern may show through its window: the last T positions
  // of every shard are gathered, and this rank takes the hl positions before pos0 from its
  // predecessors. Without a window (dense causal attention) that is every earlier position.
  const int64_t T = W > 0 ? std::min(W - 1, Lr) : Lr;
  const int64_t hl = W > 0 ? std::min(W - 1, pos0) : pos0;
  if (T > 0) {
    const Tensor tails = all_gather(
        concat({k.narrow(1, Lr - T, T).unsqueeze(0), v.narrow(1, Lr - T, T).unsqueeze(0)}, 0)
            .unsqueeze(0),
        sp);  // [R, 2, B, T, H, dh]
    if (hl > 0) {
      const int64_t first = r - (hl + T - 1) / T;  // the earliest shard the halo reaches
      std::vector<Tensor> ks, vs;
      for (int64_t j = first; j < r; ++j) {
        ks.push_back(tails.select(0, j).select(0, 0));
        vs.push_back(tails.select(0, j).select(0, 1));
      }
      Tensor kh = ks.size() == 1 ? ks[0] : concat(ks, 1),
             vh = vs.size() == 1 ? vs[0] : concat(vs, 1);
      kh = kh.narrow(1, kh.size(1) - hl, hl);
      vh = vh.narrow(1, vh.size(1) - hl, hl);
      add_part(sparse_attention_with_lse(q, kh, vh, pattern, scale, pos0, pos0 - hl));
    }
  }

  // Before the halo: global keys for the non-global queries (C), every key for the global ones (D).
  const int64_t halo_start = pos0 - hl;
  if (W > 0 && G > 0) {
    const int64_t per = (Lr + G - 1) / G + 1;  // bound on global positions in any shard
    std::vector<int64_t> mine_pos = globals_in(pos0, pos0 + Lr, G), mine_rows;
    for (int64_t p : mine_pos) mine_rows.push_back(p - pos0);
    std::vector<uint8_t> is_global(Lr, 0);
    for (int64_t row : mine_rows) is_global[row] = 1;
    const AttentionPattern all_visible{0, 0};

    // C. Every shard's global keys (padded to `per`), those before our halo in position order. Fake
    // contiguous positions 0..n-1 before the queries: all visible.
    const Tensor gkv = all_gather(concat({take_rows(k, mine_rows, per).unsqueeze(0),
                                          take_rows(v, mine_rows, per).unsqueeze(0)},
                                         0)
                                      .unsqueeze(0),
                                  sp);  // [R, 2, B, per, H, dh]
    std::vector<Tensor> kc, vc;
    for (int64_t j = 0; j < r; ++j) {
      const auto pos = globals_in(j * Lr, (j + 1) * Lr, G);
      int64_t n = 0;
      while (n < static_cast<int64_t>(pos.size()) && pos[n] < halo_start) ++n;
      if (n == 0) continue;
      kc.push_back(gkv.select(0, j).select(0, 0).narrow(1, 0, n));
      vc.push_back(gkv.select(0, j).select(0, 1).narrow(1, 0, n));
    }
    if (!kc.empty()) {
      const Tensor kk = kc.size() == 1 ? kc[0] : concat(kc, 1),
                   vv = vc.size() == 1 ? vc[0] : concat(vc, 1);
      add_part(sparse_attention_with_lse(q, kk, vv, all_visible, scale, pos0, 0), is_global);
    }

    // D. Global queries travel: each shard computes, for every later shard's global queries, the
    // partial attention over its own keys before that shard's halo, and sends it back (output and
    // lse).
    const Tensor gq =
        all_gather(take_rows(q, mine_rows, per).unsqueeze(0), sp);  // [R, B, per, H, dh]
    const double kNegInf = -std::numeric_limits<double>::infinity();
    std::vector<Tensor> send_o, send_l;
    for (int64_t dest = 0; dest < R; ++dest) {
      const int64_t dest_halo = W > 0 ? std::max<int64_t>(0, dest * Lr - (W - 1)) : 0;
      const int64_t nkeys = std::min<int64_t>(Lr, dest_halo - pos0);
      if (dest <= r || nkeys <= 0) {
        send_o.push_back(zeros({1, B, per, H, dh}, q.dtype(), q.device()));
        send_l.push_back(full({1, B, H, per}, kNegInf, acc, q.device()));
        continue;
      }
      auto [o, l] = sparse_attention_with_lse(gq.select(0, dest), k.narrow(1, 0, nkeys),
                                              v.narrow(1, 0, nkeys), all_visible, scale, nkeys, 0);
      send_o.push_back(o.unsqueeze(0));
      send_l.push_back(l.unsqueeze(0));
    }
    const std::vector<int64_t> ones(R, 1);
    const Tensor got_o =
        all_to_all(concat(send_o, 0), ones, ones, sp);  // [R (source), B, per, H, dh]
    const Tensor got_l = all_to_all(concat(send_l, 0), ones, ones, sp);  // [R, B, H, per]
    std::vector<Tensor> po, pl;
    for (int64_t j = 0; j < r; ++j) {
      po.push_back(got_o.select(0, j));
      pl.push_back(got_l.select(0, j));
    }
    if (!po.empty() && !mine_rows.empty()) {
      const auto [od, ld] = merge_attention(po, pl);  // [B, per, H, dh], [B, H, per]
      // Place the global queries' results at their positions; -inf (no part) elsewhere.
      const int64_t ng = static_cast<int64_t>(mine_rows.size());
      const Tensor o_ext =
          concat({od.narrow(1, 0, ng), zeros({B, 1, H, dh}, od.dtype(), od.device())}, 1);
      const Tensor l_ext =
          concat({ld.narrow(2, 0, ng), full({B, H, 1}, kNegInf, ld.dtype(), ld.device())}, 2);
      std::vector<int64_t> slot(Lr, ng);
      for (int64_t i = 0; i < ng; ++i) slot[mine_rows[i]] = i;
      std::vector<int64_t> oi(B * Lr * H * dh), li(B * H * Lr);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t t = 0; t < Lr; ++t)
          for (int64_t h = 0; h < H; ++h) {
            for (int64_t c = 0; c < dh; ++c) oi[((b * Lr + t) * H + h) * dh + c] = slot[t];
            li[(b * H + h) * Lr + t] = slot[t];
          }
      add_part({gather(o_ext, 1, tensor(oi, {B, Lr, H, dh}).to(q.device())),
                gather(l_ext, 2, tensor(li, {B, H, Lr}).to(q.device()))});
    }
  }
  return own.anchor(merge_attention(outs, lses, excluded).first);
}

}  // namespace hydra::parallel
