// Sequence ops: the causal depthwise convolution and the fused selective scan.
#include "autograd/dispatch.h"
#include "autograd/node.h"
#include "autograd/ops.h"
#include "autograd/rows.h"
#include "kernels/conv1d.h"
#include "kernels/selective_scan.h"

namespace hydra {
namespace {

void check_like(const char* op, const char* name, const Tensor& t, const Tensor& ref) {
  HYDRA_CHECK(t.dtype() == ref.dtype() && t.device() == ref.device())
      << op << ": " << name << " is " << dtype_name(t.dtype()) << " on " << t.device().str()
      << ", expected " << dtype_name(ref.dtype()) << " on " << ref.device().str();
}

void check_shape(const char* op, const char* name, const Tensor& t, const Shape& expected) {
  HYDRA_CHECK(t.shape() == expected) << op << ": " << name << " has shape " << shape_str(t.shape())
                                     << ", expected " << shape_str(expected);
}

}  // namespace

Tensor causal_conv1d(const Tensor& x_in, const Tensor& w_in, const Tensor& bias_in,
                     const Tensor& prefix_in, bool silu) {
  const char* op = "causal_conv1d";
  HYDRA_CHECK(x_in.dim() == 3 && is_floating(x_in.dtype()))
      << op << ": x must be [B, L, C] floating, got " << shape_str(x_in.shape());
  const int64_t B = x_in.size(0), L = x_in.size(1), C = x_in.size(2);
  HYDRA_CHECK(w_in.dim() == 2 && w_in.size(0) == C && w_in.size(1) >= 1)
      << op << ": weight " << shape_str(w_in.shape()) << " does not match x "
      << shape_str(x_in.shape()) << " (expected [C, width])";
  const int64_t W = w_in.size(1);
  check_like(op, "weight", w_in, x_in);
  if (bias_in.defined()) {
    check_shape(op, "bias", bias_in, {C});
    check_like(op, "bias", bias_in, x_in);
  }
  if (prefix_in.defined()) {
    check_shape(op, "prefix", prefix_in, {B, W - 1, C});
    check_like(op, "prefix", prefix_in, x_in);
  }
  // Rows of x may lie apart (a part of a wider projection's output: no copy), its channels not.
  const bool rows_apart = L > 0 && x_in.stride(2) == 1 && x_in.stride(1) >= C &&
                          (B == 1 || x_in.stride(0) == L * x_in.stride(1));
  Tensor x = rows_apart ? x_in.detach() : x_in.contiguous(), w = w_in.contiguous();
  const int64_t x_row = rows_apart ? x.stride(1) : C;
  Tensor bias = bias_in.defined() ? bias_in.contiguous() : Tensor();
  Tensor prefix = prefix_in.defined() ? prefix_in.contiguous() : Tensor();
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device());
  kernels::CausalConv1dParams p;
  p.dtype = x.dtype();
  p.x = x.raw_data();
  p.x_row = x_row;
  p.w = w.raw_data();
  p.bias = bias.defined() ? bias.raw_data() : nullptr;
  p.prefix = prefix.defined() ? prefix.raw_data() : nullptr;
  p.y = y.raw_data();
  p.batch = B;
  p.len = L;
  p.channels = C;
  p.width = W;
  p.silu = silu;
  p.stream = current_stream(x.device());
  if (y.numel() > 0) HYDRA_LAUNCH(x.device(), causal_conv1d_fwd, p);
  if (any_requires_grad({x_in, w_in, bias_in, prefix_in})) {
    SavedTensor sx(x), sw(w), sb(bias), sp(prefix);
    const bool need_prefix = prefix_in.defined() && prefix_in.requires_grad();
    record_op(op, {x_in, w_in, bias_in, prefix_in}, {y}, [=](const std::vector<Tensor>& g) {
      Tensor xv = sx.get(), wv = sw.get(), bv = sb.get(), pv = sp.get(), gy = g[0].contiguous();
      Tensor gx = Tensor::empty(xv.shape(), xv.dtype(), xv.device());  // contiguous
      Tensor gw = Tensor::empty(wv.shape(), wv.dtype(), wv.device());
      Tensor gb = bv.defined() ? Tensor::empty(bv.shape(), bv.dtype(), bv.device()) : Tensor();
      Tensor gp = need_prefix ? Tensor::empty(pv.shape(), pv.dtype(), pv.device()) : Tensor();
      kernels::CausalConv1dBwdParams q;
      q.dtype = xv.dtype();
      q.x = xv.raw_data();
      q.x_row = x_row;
      q.w = wv.raw_data();
      q.bias = bv.defined() ? bv.raw_data() : nullptr;
      q.prefix = pv.defined() ? pv.raw_data() : nullptr;
      q.gy = gy.raw_data();
      q.gx = gx.raw_data();
      q.gw = gw.raw_data();
      q.gbias = gb.defined() ? gb.raw_data() : nullptr;
      q.gprefix = gp.defined() ? gp.raw_data() : nullptr;
      q.batch = B;
      q.len = L;
      q.channels = C;
      q.width = W;
      q.silu = silu;
      q.stream = current_stream(xv.device());
      const Tensor ws = HYDRA_CUDA_WORKSPACE(xv.device(), causal_conv1d_bwd_workspace, q);
      q.workspace = ws.defined() ? ws.raw_data() : nullptr;
      if (gx.numel() > 0) {
        HYDRA_LAUNCH(xv.device(), causal_conv1d_bwd, q);
      } else {
        gw.zero_();
        if (gb.defined()) gb.zero_();
        if (gp.defined()) gp.zero_();
      }
      return std::vector<Tensor>{gx, gw, gb, gp};
    });
  }
  return y;
}

namespace {

// The selective scan's shape, dtype and device checks, each naming the input.
void check_scan_inputs(const Tensor& u_in, const Tensor& delta_in, const Tensor& A_log_in,
                       const Tensor& B_in, const Tensor& C_in, const Tensor& D_in,
                       const Tensor& dt_bias_in, const Tensor& z_in, const Tensor& h0_in,
                       int64_t chunk_len) {
  const char* op = "selective_scan";
  HYDRA_CHECK(u_in.dim() == 3 && is_floating(u_in.dtype()))
      << op << ": u must be [B, L, D] floating, got " << shape_str(u_in.shape());
  HYDRA_CHECK(chunk_len >= 1) << op << ": chunk_len must be >= 1, got " << chunk_len;
  const int64_t Bsz = u_in.size(0), L = u_in.size(1), Dm = u_in.size(2);
  HYDRA_CHECK(A_log_in.dim() == 2 && A_log_in.size(0) == Dm)
      << op << ": A_log " << shape_str(A_log_in.shape()) << " does not match u "
      << shape_str(u_in.shape()) << " (expected [D, N])";
  const int64_t N = A_log_in.size(1);
  const DType acc = accumulate_dtype(u_in.dtype());
  check_shape(op, "delta", delta_in, {Bsz, L, Dm});
  check_shape(op, "B", B_in, {Bsz, L, N});
  check_shape(op, "C", C_in, {Bsz, L, N});
  for (auto [name, t] :
       {std::pair{"delta", &delta_in}, {"A_log", &A_log_in}, {"B", &B_in}, {"C", &C_in}})
    check_like(op, name, *t, u_in);
  if (D_in.defined()) {
    check_shape(op, "D", D_in, {Dm});
    check_like(op, "D", D_in, u_in);
  }
  if (dt_bias_in.defined()) {
    check_shape(op, "dt_bias", dt_bias_in, {Dm});
    check_like(op, "dt_bias", dt_bias_in, u_in);
  }
  if (z_in.defined()) {
    check_shape(op, "z", z_in, {Bsz, L, Dm});
    check_like(op, "z", z_in, u_in);
  }
  if (h0_in.defined()) {
    check_shape(op, "h0", h0_in, {Bsz, Dm, N});
    HYDRA_CHECK(h0_in.dtype() == acc && h0_in.device() == u_in.device())
        << op << ": h0 must be " << dtype_name(acc) << " on " << u_in.device().str();
  }
}

void* data_or_null(const Tensor& t) { return t.defined() ? t.raw_data() : nullptr; }

// The scan's inputs (rows of the projections, possibly strided) and outputs, as the kernels take
// them (kernels/selective_scan.h).
struct ScanTensors {
  Rows u, delta, B, C, z;
  Tensor A_log, D, dt_bias, h0;    // contiguous or undefined
  Tensor y, h_last, chunk_states;  // outputs; chunk_states only when a backward will run
};

kernels::SelectiveScanParams scan_params(const ScanTensors& t, int64_t chunk_len) {
  kernels::SelectiveScanParams p;
  p.dtype = t.u.t.dtype();
  p.batch = t.u.t.size(0);
  p.len = t.u.t.size(1);
  p.dim = t.u.t.size(2);
  p.state = t.A_log.size(1);
  p.chunk_len = chunk_len;
  p.u = t.u.t.raw_data();
  p.u_row = t.u.row;
  p.delta = t.delta.t.raw_data();
  p.delta_row = t.delta.row;
  p.z = data_or_null(t.z.t);
  p.z_row = t.z.row;
  p.B = t.B.t.raw_data();
  p.B_row = t.B.row;
  p.C = t.C.t.raw_data();
  p.C_row = t.C.row;
  p.dt_bias = data_or_null(t.dt_bias);
  p.A_log = t.A_log.raw_data();
  p.D = data_or_null(t.D);
  p.h0 = data_or_null(t.h0);
  p.y = t.y.raw_data();
  p.h_last = t.h_last.raw_data();
  p.chunk_states = data_or_null(t.chunk_states);
  p.stream = current_stream(t.u.t.device());
  return p;
}

// The backward of the scan run with `p` (the forward's tensors kept alive by the caller): the
// gradients of u, delta, A_log, B, C, D, dt_bias, z and h0 (undefined where the input was).
std::vector<Tensor> selective_scan_backward(const kernels::SelectiveScanParams& p, Device dev,
                                            const Tensor& gy_in, const Tensor& gh_in,
                                            bool need_h0) {
  const int64_t Bsz = p.batch, L = p.len, Dm = p.dim, N = p.state;
  const DType acc = accumulate_dtype(p.dtype);
  const Tensor gy = gy_in.defined() ? gy_in.contiguous() : zeros({Bsz, L, Dm}, p.dtype, dev);
  const Tensor gh = gh_in.defined() ? gh_in.to(acc).contiguous() : Tensor();
  auto like = [&](const Shape& s, DType t) { return Tensor::empty(s, t, dev); };
  Tensor gu = like({Bsz, L, Dm}, p.dtype), gdelta = like({Bsz, L, Dm}, p.dtype);
  Tensor gz = p.z ? like({Bsz, L, Dm}, p.dtype) : Tensor();
  Tensor gB = like({Bsz, L, N}, p.dtype), gC = like({Bsz, L, N}, p.dtype);
  Tensor gA = like({Dm, N}, p.dtype);
  Tensor gD = p.D ? like({Dm}, p.dtype) : Tensor();
  Tensor gbias = p.dt_bias ? like({Dm}, p.dtype) : Tensor();
  Tensor gh0 = need_h0 ? like({Bsz, Dm, N}, acc) : Tensor();
  kernels::SelectiveScanBwdParams q;
  q.fwd = p;
  q.gy = gy.raw_data();
  q.g_hlast = data_or_null(gh);
  q.gu = gu.raw_data();
  q.gdelta = gdelta.raw_data();
  q.gz = data_or_null(gz);
  q.gB = gB.raw_data();
  q.gC = gC.raw_data();
  q.gdt_bias = data_or_null(gbias);
  q.gA_log = gA.raw_data();
  q.gD = data_or_null(gD);
  q.gh0 = data_or_null(gh0);
  q.fwd.stream = current_stream(dev);
  if (L > 0 && Bsz * Dm > 0) {
    const Tensor ws = HYDRA_CUDA_WORKSPACE(dev, selective_scan_bwd_workspace, q);
    q.workspace = ws.defined() ? ws.raw_data() : nullptr;
    HYDRA_LAUNCH(dev, selective_scan_bwd, q);
  } else {
    for (Tensor* t : {&gu, &gdelta, &gz, &gB, &gC, &gA, &gD, &gbias})
      if (t->defined()) t->zero_();
    if (gh0.defined()) gh0.copy_(gh.defined() ? gh : zeros({Bsz, Dm, N}, acc, dev));
  }
  return {gu, gdelta, gA, gB, gC, gD, gbias, gz, gh0};
}

}  // namespace

SelectiveScanResult selective_scan(const Tensor& u_in, const Tensor& delta_in,
                                   const Tensor& A_log_in, const Tensor& B_in, const Tensor& C_in,
                                   const Tensor& D_in, const Tensor& dt_bias_in, const Tensor& z_in,
                                   const Tensor& h0_in, int64_t chunk_len) {
  check_scan_inputs(u_in, delta_in, A_log_in, B_in, C_in, D_in, dt_bias_in, z_in, h0_in, chunk_len);
  const int64_t Bsz = u_in.size(0), L = u_in.size(1), Dm = u_in.size(2), N = A_log_in.size(1);
  const DType acc = accumulate_dtype(u_in.dtype());
  const Device dev = u_in.device();
  const bool need_grad =
      any_requires_grad({u_in, delta_in, A_log_in, B_in, C_in, D_in, dt_bias_in, z_in, h0_in});
  ScanTensors t;
  t.u = as_rows(u_in);
  t.delta = as_rows(delta_in);
  t.B = as_rows(B_in);
  t.C = as_rows(C_in);
  if (z_in.defined()) t.z = as_rows(z_in);
  t.A_log = A_log_in.contiguous();
  if (D_in.defined()) t.D = D_in.contiguous();
  if (dt_bias_in.defined()) t.dt_bias = dt_bias_in.contiguous();
  if (h0_in.defined()) t.h0 = h0_in.contiguous();
  t.y = Tensor::empty({Bsz, L, Dm}, u_in.dtype(), dev);
  t.h_last = Tensor::empty({Bsz, Dm, N}, acc, dev);
  if (need_grad)
    t.chunk_states = Tensor::empty({Bsz, kernels::ssm_num_chunks(L, chunk_len), Dm, N}, acc, dev);
  kernels::SelectiveScanParams p = scan_params(t, chunk_len);
  if (Bsz * Dm > 0) {
    if (L == 0) {
      t.h_last.copy_(t.h0.defined() ? t.h0 : zeros({Bsz, Dm, N}, acc, dev));
    } else {
      const Tensor ws = HYDRA_CUDA_WORKSPACE(dev, selective_scan_fwd_workspace, p);
      p.workspace = ws.defined() ? ws.raw_data() : nullptr;
      HYDRA_LAUNCH(dev, selective_scan_fwd, p);
      p.workspace = nullptr;  // released with `ws`
    }
  }

  if (need_grad) {
    // The saved tensors keep the pointers in `p` alive.
    std::vector<SavedTensor> saved = {
        SavedTensor(t.u.t), SavedTensor(t.delta.t),     SavedTensor(t.z.t),   SavedTensor(t.B.t),
        SavedTensor(t.C.t), SavedTensor(t.dt_bias),     SavedTensor(t.A_log), SavedTensor(t.D),
        SavedTensor(t.h0),  SavedTensor(t.chunk_states)};
    const bool need_h0 = h0_in.defined() && h0_in.requires_grad();
    record_op("selective_scan",
              {u_in, delta_in, A_log_in, B_in, C_in, D_in, dt_bias_in, z_in, h0_in},
              {t.y, t.h_last}, [=](const std::vector<Tensor>& g) {
                for (const SavedTensor& s : saved) (void)s.get();  // version checks
                return selective_scan_backward(p, dev, g[0], g[1], need_h0);
              });
  }
  return {t.y, t.h_last};
}

}  // namespace hydra
