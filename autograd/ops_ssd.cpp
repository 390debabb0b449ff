// Mamba-2's SSD form of the selective scan (ops.h: ssd_scan), composed of differentiable ops: the
// recurrence within a chunk as a masked matrix product, the states between chunks as a second one
// over the chunks (spec/algorithms.md section 1, docs/MODEL.md "The SSD form").
#include <map>
#include <mutex>
#include <tuple>

#include "autograd/ops.h"

namespace hydra {
namespace {

// Constant [n, n] masks on a device, built once per (n, dtype, device) and kept for the process:
// ONES has 1 where column <= row, else 0; NEG_INF has 0 there and -inf above the diagonal.
enum class Mask { kOnes, kNegInf };

const Tensor& causal_mask(int64_t n, Mask kind, DType dtype, Device device) {
  static std::mutex mutex;
  // Never destroyed: device tensors must not be freed after the device runtime has shut down.
  static auto* cache = new std::map<std::tuple<int64_t, int, int, std::string>, Tensor>();
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key =
      std::make_tuple(n, static_cast<int>(kind), static_cast<int>(dtype), device.str());
  auto it = cache->find(key);
  if (it == cache->end()) {
    std::vector<double> v(static_cast<size_t>(n * n));
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j)
        v[i * n + j] = j <= i
                           ? (kind == Mask::kOnes ? 1.0 : 0.0)
                           : (kind == Mask::kOnes ? 0.0 : -std::numeric_limits<double>::infinity());
    it = cache->emplace(key, tensor(v, {n, n}).to(dtype).to(device)).first;
  }
  return it->second;
}

// Inclusive cumulative sum over the last axis: x [..., n] @ the transposed ONES mask.
Tensor cumsum_last(const Tensor& x) {
  const int64_t n = x.size(-1);
  return matmul(x, causal_mask(n, Mask::kOnes, x.dtype(), x.device()).transpose(0, 1));
}

// exp(s_i - s_j) where j <= i, else 0, for s [..., n]: [..., n, n].
Tensor segment_decays(const Tensor& s) {
  const int64_t n = s.size(-1), k = s.dim();
  return exp(add(sub(s.unsqueeze(k), s.unsqueeze(k - 1)),
                 causal_mask(n, Mask::kNegInf, s.dtype(), s.device())));
}

void check(bool ok, const std::string& what) { HYDRA_CHECK(ok) << "ssd_scan: " << what; }

}  // namespace

SelectiveScanResult ssd_scan(const Tensor& u_in, const Tensor& delta_raw, const Tensor& A_log,
                             const Tensor& B_in, const Tensor& C_in, const Tensor& D,
                             const Tensor& dt_bias, const Tensor& z, const Tensor& h0,
                             int64_t chunk_len) {
  check(u_in.dim() == 3 && is_floating(u_in.dtype()),
        "u must be [B, L, D] floating, got " + shape_str(u_in.shape()));
  check(chunk_len >= 1, "chunk_len must be >= 1, got " + std::to_string(chunk_len));
  const int64_t Bsz = u_in.size(0), L = u_in.size(1), Dm = u_in.size(2);
  check(A_log.dim() == 1 && A_log.size(0) >= 1 && Dm % A_log.size(0) == 0,
        "A_log " + shape_str(A_log.shape()) + " must be [H] with H dividing u's " +
            std::to_string(Dm) + " channels");
  const int64_t H = A_log.size(0), P = Dm / H;
  check(B_in.dim() == 3 && B_in.size(0) == Bsz && B_in.size(1) == L,
        "B has shape " + shape_str(B_in.shape()) + ", expected [" + std::to_string(Bsz) + ", " +
            std::to_string(L) + ", N]");
  const int64_t N = B_in.size(2);
  auto expect = [&](const char* name, const Tensor& t, const Shape& s) {
    check(t.shape() == s,
          std::string(name) + " has shape " + shape_str(t.shape()) + ", expected " + shape_str(s));
    check(t.device() == u_in.device(),
          std::string(name) + " is on " + t.device().str() + ", expected " + u_in.device().str());
  };
  expect("delta", delta_raw, {Bsz, L, H});
  expect("C", C_in, {Bsz, L, N});
  if (D.defined()) expect("D", D, {Dm});
  if (dt_bias.defined()) expect("dt_bias", dt_bias, {H});
  if (z.defined()) expect("z", z, {Bsz, L, Dm});
  if (h0.defined()) expect("h0", h0, {Bsz, Dm, N});

  // Everything computes in the accumulate dtype (fp32 for 16-bit inputs).
  const DType acc = accumulate_dtype(u_in.dtype());
  const Device dev = u_in.device();
  if (Bsz * Dm == 0 || L == 0) {
    const Tensor h = h0.defined() ? h0.to(acc) : zeros({Bsz, Dm, N}, acc, dev);
    return {zeros({Bsz, L, Dm}, u_in.dtype(), dev), h};
  }
  const int64_t Q = std::min(chunk_len, L), nc = (L + Q - 1) / Q, Lp = nc * Q;
  Tensor dl = delta_raw.to(acc);
  if (dt_bias.defined()) dl = add(dl, dt_bias.to(acc));
  dl = softplus(dl);  // [B, L, H]
  Tensor x = u_in.to(acc), Bm = B_in.to(acc), Cm = C_in.to(acc);
  if (Lp > L) {  // pad the last chunk: delta 0 (decay 1) and zero inputs leave the state as it is
    auto pad = [&](const Tensor& t) {
      return concat({t, zeros({Bsz, Lp - L, t.size(2)}, acc, dev)}, 1);
    };
    dl = pad(dl);
    x = pad(x);
    Bm = pad(Bm);
    Cm = pad(Cm);
  }
  const Tensor A = neg(exp(A_log.to(acc)));  // [H], the decay rates (negative)
  // cs: the cumulative log-decay within each chunk, inclusive: [B, H, nc, Q].
  const Tensor cs = cumsum_last(mul(dl, A).reshape({Bsz, nc, Q, H}).permute({0, 3, 1, 2}));
  const Tensor Bc = Bm.reshape({Bsz, nc, Q, N}), Cc = Cm.reshape({Bsz, nc, Q, N});
  const Tensor xd = mul(x.reshape({Bsz, Lp, H, P}), dl.unsqueeze(3));  // delta_t u_t [B, Lp, H, P]

  // Within a chunk: y_i += sum_{j <= i} exp(cs_i - cs_j) (C_i . B_j) xd_j, per head.
  const Tensor G = matmul(Cc, Bc.transpose(2, 3));                            // [B, nc, Q, Q]
  const Tensor M = mul(segment_decays(cs), G.unsqueeze(1));                   // [B, H, nc, Q, Q]
  const Tensor xh = xd.reshape({Bsz, nc, Q, H, P}).permute({0, 3, 1, 2, 4});  // [B, H, nc, Q, P]
  const Tensor y_diag = matmul(M, xh.contiguous()).permute({0, 2, 3, 1, 4});  // [B, nc, Q, H, P]

  // Each chunk's state from zero: S_c = sum_j exp(cs_last - cs_j) B_j xd_j, [B, nc, N, H P].
  const Tensor to_end =
      exp(sub(cs.narrow(3, Q - 1, 1), cs)).permute({0, 2, 3, 1});  // [B, nc, Q, H]
  const Tensor S =
      matmul(Bc.transpose(2, 3),
             mul(xd.reshape({Bsz, nc, Q, H, P}), to_end.unsqueeze(4)).reshape({Bsz, nc, Q, H * P}));

  // Between chunks: the state entering chunk c (c = 0 .. nc, the last one h_last) is
  // sum_{j <= c} exp(E_c - E_j) states_j with states = [h0, S_0, .., S_{nc-1}] and E the chunks'
  // summed log-decays before c: one more masked product, over the chunks.
  const Tensor totals = cs.narrow(3, Q - 1, 1).squeeze(3);                          // [B, H, nc]
  const Tensor E = cumsum_last(concat({zeros({Bsz, H, 1}, acc, dev), totals}, 2));  // [B, H, nc+1]
  const Tensor Sh =
      S.reshape({Bsz, nc, N, H, P}).permute({0, 3, 1, 2, 4}).reshape({Bsz, H, nc, N * P});
  const Tensor first =
      h0.defined()
          ? h0.to(acc).reshape({Bsz, H, P, N}).permute({0, 1, 3, 2}).reshape({Bsz, H, 1, N * P})
          : zeros({Bsz, H, 1, N * P}, acc, dev);
  const Tensor entering = matmul(segment_decays(E), concat({first, Sh}, 2));  // [B, H, nc+1, N P]
  const Tensor h_last =
      entering.select(2, nc).reshape({Bsz, H, N, P}).permute({0, 1, 3, 2}).reshape({Bsz, Dm, N});

  // From the entering states: y_i += exp(cs_i) C_i . state_c.
  const Tensor Sin = entering.narrow(2, 0, nc)
                         .reshape({Bsz, H, nc, N, P})
                         .permute({0, 2, 3, 1, 4})
                         .reshape({Bsz, nc, N, H * P});
  const Tensor y_off =
      mul(matmul(Cc, Sin).reshape({Bsz, nc, Q, H, P}), exp(cs).permute({0, 2, 3, 1}).unsqueeze(4));
  Tensor y = add(y_diag, y_off).reshape({Bsz, Lp, Dm});
  if (Lp > L) y = y.narrow(1, 0, L);
  if (D.defined()) y = add(y, mul(x.narrow(1, 0, L), D.to(acc)));
  if (z.defined()) y = mul(y, silu(z.to(acc)));
  return {y.to(u_in.dtype()), h_last};
}

}  // namespace hydra
