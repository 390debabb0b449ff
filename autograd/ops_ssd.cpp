// Mamba-2's SSD form of the selective scan (ops.h: ssd_scan): the fused kernels
// (kernels/ssd_scan.h) for the scan, its skip term and its gate, with delta's softplus as ops
// before them; and the same form composed of differentiable ops (ssd_scan_composed: the recurrence
// within a chunk as a masked matrix product, the states between chunks as a second one over the
// chunks), the reference the kernels are tested against and the path for sizes the CUDA kernels do
// not take (spec/algorithms.md section 1, docs/MODEL.md "The SSD form").
#include <map>
#include <mutex>
#include <tuple>

#include "autograd/dispatch.h"
#include "autograd/node.h"
#include "autograd/ops.h"
#include "autograd/rows.h"
#include "kernels/ssd_scan.h"

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

// The inputs' shapes and devices, each error naming the input (both paths run these).
void check_inputs(const Tensor& u, const Tensor& delta_raw, const Tensor& A_log, const Tensor& B,
                  const Tensor& C, const Tensor& D, const Tensor& dt_bias, const Tensor& z,
                  const Tensor& h0, int64_t chunk_len) {
  check(u.dim() == 3 && is_floating(u.dtype()),
        "u must be [B, L, D] floating, got " + shape_str(u.shape()));
  check(chunk_len >= 1, "chunk_len must be >= 1, got " + std::to_string(chunk_len));
  const int64_t Bsz = u.size(0), L = u.size(1), Dm = u.size(2);
  check(A_log.dim() == 1 && A_log.size(0) >= 1 && Dm % A_log.size(0) == 0,
        "A_log " + shape_str(A_log.shape()) + " must be [H] with H dividing u's " +
            std::to_string(Dm) + " channels");
  const int64_t H = A_log.size(0);
  check(B.dim() == 3 && B.size(0) == Bsz && B.size(1) == L,
        "B has shape " + shape_str(B.shape()) + ", expected [" + std::to_string(Bsz) + ", " +
            std::to_string(L) + ", N]");
  const int64_t N = B.size(2);
  auto expect = [&](const char* name, const Tensor& t, const Shape& s) {
    check(t.shape() == s,
          std::string(name) + " has shape " + shape_str(t.shape()) + ", expected " + shape_str(s));
    check(t.device() == u.device(),
          std::string(name) + " is on " + t.device().str() + ", expected " + u.device().str());
  };
  expect("delta", delta_raw, {Bsz, L, H});
  expect("B", B, {Bsz, L, N});
  expect("C", C, {Bsz, L, N});
  if (D.defined()) expect("D", D, {Dm});
  if (dt_bias.defined()) expect("dt_bias", dt_bias, {H});
  if (z.defined()) expect("z", z, {Bsz, L, Dm});
  if (h0.defined()) expect("h0", h0, {Bsz, Dm, N});
}

void* data_or_null(const Tensor& t) { return t.defined() ? t.raw_data() : nullptr; }

// The kernels' scan: x [B, L, H P], B and C [B, L, N], D [H P] and z [B, L, H P] (each optional)
// in one dtype, dl [B, L, H] and A [H] (and h0) in its accumulate dtype; y = (scan + D x) SiLU(z)
// [B, L, H P] in the dtype, h_last [B, H P, N] in the accumulate dtype.
SelectiveScanResult ssd_core(const Tensor& x_in, const Tensor& dl_in, const Tensor& A_in,
                             const Tensor& B_in, const Tensor& C_in, const Tensor& D_in,
                             const Tensor& z_in, const Tensor& h0_in, int64_t chunk_len) {
  const int64_t Bsz = x_in.size(0), L = x_in.size(1), Dm = x_in.size(2), H = A_in.size(0),
                N = B_in.size(2);
  const DType acc = accumulate_dtype(x_in.dtype());
  const Device dev = x_in.device();
  const Rows xr = as_rows(x_in), Br = as_rows(B_in), Cr = as_rows(C_in);
  const Rows zr = z_in.defined() ? as_rows(z_in) : Rows{};
  const Tensor &x = xr.t, &Bm = Br.t, &Cm = Cr.t, &z = zr.t;
  const Tensor dl = dl_in.contiguous(), A = A_in.contiguous();
  const Tensor D = D_in.defined() ? D_in.contiguous() : Tensor();
  const Tensor h0 = h0_in.defined() ? h0_in.contiguous() : Tensor();
  const bool need_grad = any_requires_grad({x_in, dl_in, A_in, B_in, C_in, D_in, z_in, h0_in});
  const Tensor y = Tensor::empty({Bsz, L, Dm}, x.dtype(), dev);
  const Tensor h_last = Tensor::empty({Bsz, Dm, N}, acc, dev);
  const Tensor states =
      Tensor::empty({Bsz, H, kernels::ssd_num_chunks(L, chunk_len), N, Dm / H}, acc, dev);
  const Tensor pre = need_grad && z.defined() ? Tensor::empty({Bsz, L, Dm}, acc, dev) : Tensor();
  kernels::SsdScanParams p;
  p.dtype = x.dtype();
  p.batch = Bsz, p.len = L, p.heads = H, p.head_dim = Dm / H, p.state = N;
  p.chunk_len = chunk_len;
  p.x = x.raw_data(), p.x_row = xr.row;
  p.dl = dl.raw_data(), p.A = A.raw_data();
  p.B = Bm.raw_data(), p.B_row = Br.row;
  p.C = Cm.raw_data(), p.C_row = Cr.row;
  p.D = data_or_null(D);
  p.z = data_or_null(z), p.z_row = zr.row;
  p.h0 = data_or_null(h0);
  p.y = y.raw_data(), p.h_last = h_last.raw_data(), p.states = states.raw_data();
  p.pre = data_or_null(pre);
  p.stream = current_stream(dev);
  {
    const Tensor ws = HYDRA_CUDA_WORKSPACE(dev, ssd_scan_fwd_workspace, p);
    p.workspace = ws.defined() ? ws.raw_data() : nullptr;
    HYDRA_LAUNCH(dev, ssd_scan_fwd, p);
    p.workspace = nullptr;  // released with `ws`
  }
  if (need_grad) {
    const std::vector<SavedTensor> saved = {
        SavedTensor(x), SavedTensor(dl), SavedTensor(A),  SavedTensor(Bm),  SavedTensor(Cm),
        SavedTensor(D), SavedTensor(z),  SavedTensor(h0), SavedTensor(pre), SavedTensor(states)};
    const bool need_h0 = h0_in.defined() && h0_in.requires_grad();
    record_op("ssd_scan", {x_in, dl_in, A_in, B_in, C_in, D_in, z_in, h0_in}, {y, h_last},
              [=](const std::vector<Tensor>& g) {
                for (const SavedTensor& t : saved) (void)t.get();  // version checks
                const Tensor gy = g[0].defined() ? g[0].to(p.dtype).contiguous()
                                                 : zeros({Bsz, L, Dm}, p.dtype, dev);
                const Tensor gh = g[1].defined() ? g[1].to(acc).contiguous() : Tensor();
                kernels::SsdScanBwdParams q;
                q.fwd = p;
                q.fwd.stream = current_stream(dev);
                Tensor gx = Tensor::empty({Bsz, L, Dm}, p.dtype, dev);
                Tensor gdl = Tensor::empty({Bsz, L, H}, acc, dev);
                Tensor gA = Tensor::empty({H}, acc, dev);
                Tensor gB = Tensor::empty({Bsz, L, N}, p.dtype, dev);
                Tensor gC = Tensor::empty({Bsz, L, N}, p.dtype, dev);
                Tensor gD = p.D ? Tensor::empty({Dm}, p.dtype, dev) : Tensor();
                Tensor gz = p.z ? Tensor::empty({Bsz, L, Dm}, p.dtype, dev) : Tensor();
                Tensor gh0 = need_h0 ? Tensor::empty({Bsz, Dm, N}, acc, dev) : Tensor();
                q.gy = gy.raw_data();
                q.g_hlast = data_or_null(gh);
                q.gx = gx.raw_data(), q.gdl = gdl.raw_data(), q.gA = gA.raw_data();
                q.gB = gB.raw_data(), q.gC = gC.raw_data(), q.gh0 = data_or_null(gh0);
                q.gD = data_or_null(gD), q.gz = data_or_null(gz);
                const Tensor ws = HYDRA_CUDA_WORKSPACE(dev, ssd_scan_bwd_workspace, q);
                q.workspace = ws.defined() ? ws.raw_data() : nullptr;
                HYDRA_LAUNCH(dev, ssd_scan_bwd, q);
                return std::vector<Tensor>{gx, gdl, gA, gB, gC, gD, gz, gh0};
              });
  }
  return {y, h_last};
}

// Whether the kernels take this scan: any size on the CPU (f32, f64); on CUDA the sizes
// ssd_scan_supported names.
bool fused_applies(const Tensor& u, int64_t H, int64_t N, int64_t chunk_len) {
  if (u.size(0) * u.size(1) * u.size(2) == 0) return false;
  if (u.device().is_cpu()) return u.dtype() == DType::kF32 || u.dtype() == DType::kF64;
#if HYDRA_WITH_CUDA
  kernels::SsdScanParams p;
  p.dtype = u.dtype();
  p.batch = u.size(0), p.len = u.size(1), p.heads = H, p.head_dim = u.size(2) / H, p.state = N;
  p.chunk_len = chunk_len;
  return kernels::cuda::ssd_scan_supported(p);
#else
  return false;
#endif
}

}  // namespace

SelectiveScanResult ssd_scan(const Tensor& u_in, const Tensor& delta_raw, const Tensor& A_log,
                             const Tensor& B_in, const Tensor& C_in, const Tensor& D,
                             const Tensor& dt_bias, const Tensor& z, const Tensor& h0,
                             int64_t chunk_len) {
  check_inputs(u_in, delta_raw, A_log, B_in, C_in, D, dt_bias, z, h0, chunk_len);
  const bool same_dtype = B_in.dtype() == u_in.dtype() && C_in.dtype() == u_in.dtype() &&
                          (!D.defined() || D.dtype() == u_in.dtype()) &&
                          (!z.defined() || z.dtype() == u_in.dtype());
  if (!same_dtype || !fused_applies(u_in, A_log.size(0), B_in.size(2), chunk_len))
    return ssd_scan_composed(u_in, delta_raw, A_log, B_in, C_in, D, dt_bias, z, h0, chunk_len);
  const DType acc = accumulate_dtype(u_in.dtype());
  Tensor dl = delta_raw.to(acc);
  if (dt_bias.defined()) dl = add(dl, dt_bias.to(acc));
  dl = softplus(dl);                         // [B, L, H]
  const Tensor A = neg(exp(A_log.to(acc)));  // [H], the decay rates (negative)
  return ssd_core(u_in, dl, A, B_in, C_in, D, z, h0.defined() ? h0.to(acc) : Tensor(), chunk_len);
}

SelectiveScanResult ssd_scan_composed(const Tensor& u_in, const Tensor& delta_raw,
                                      const Tensor& A_log, const Tensor& B_in, const Tensor& C_in,
                                      const Tensor& D, const Tensor& dt_bias, const Tensor& z,
                                      const Tensor& h0, int64_t chunk_len) {
  check_inputs(u_in, delta_raw, A_log, B_in, C_in, D, dt_bias, z, h0, chunk_len);
  const int64_t Bsz = u_in.size(0), L = u_in.size(1), Dm = u_in.size(2), H = A_log.size(0),
                P = Dm / H, N = B_in.size(2);

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
