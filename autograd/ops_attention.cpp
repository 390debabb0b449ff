#include "autograd/dispatch.h"
#include "autograd/node.h"
#include "autograd/ops.h"
#include "kernels/attention.h"
#include "kernels/rope.h"

namespace hydra {
namespace {

// A [B, L, H, dh] tensor as tokens `row` elements apart with contiguous heads; copies when it is
// not.
struct TokenRows {
  Tensor t;
  int64_t row = 0;
};
TokenRows as_token_rows(const Tensor& t) {
  const int64_t B = t.size(0), L = t.size(1), H = t.size(2), dh = t.size(3);
  const bool inner = (t.stride(3) == 1 || dh == 1) && (t.stride(2) == dh || H == 1);
  const int64_t row = L > 1 ? t.stride(1) : (B > 1 ? t.stride(0) : H * dh);
  const bool outer = B == 1 || L == 1 || t.stride(0) == L * row;
  if (inner && outer && row >= H * dh) return {t, row};
  return {t.contiguous(), H * dh};
}

void check_qkv(const char* op, const Tensor& q, const Tensor& k, const Tensor& v) {
  HYDRA_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4)
      << op << ": q, k, v must be [B, L, H, dh], got " << shape_str(q.shape()) << ", "
      << shape_str(k.shape()) << ", " << shape_str(v.shape());
  HYDRA_CHECK(k.shape() == v.shape() && q.size(0) == k.size(0) && q.size(2) == k.size(2) &&
              q.size(3) == k.size(3))
      << op << ": q " << shape_str(q.shape()) << ", k " << shape_str(k.shape()) << ", v "
      << shape_str(v.shape()) << " do not match";
  HYDRA_CHECK(q.dtype() == k.dtype() && q.dtype() == v.dtype() && q.device() == k.device() &&
              q.device() == v.device())
      << op << ": q, k, v differ in dtype or device";
  HYDRA_CHECK(is_floating(q.dtype())) << op << ": floating inputs expected";
}

}  // namespace

std::pair<Tensor, Tensor> sparse_attention_with_lse(const Tensor& q_in, const Tensor& k_in,
                                                    const Tensor& v_in,
                                                    const AttentionPattern& pattern, double scale,
                                                    int64_t q_pos0, int64_t k_pos0) {
  check_qkv("sparse_attention", q_in, k_in, v_in);
  const TokenRows q = as_token_rows(q_in), k = as_token_rows(k_in), v = as_token_rows(v_in);
  const int64_t B = q_in.size(0), Lq = q_in.size(1), Lk = k_in.size(1), H = q_in.size(2),
                dh = q_in.size(3);
  const Device dev = q_in.device();
  Tensor out = Tensor::empty({B, Lq, H, dh}, q_in.dtype(), dev);
  Tensor lse = Tensor::empty({B, H, Lq}, accumulate_dtype(q_in.dtype()), dev);
  kernels::AttentionParams p;
  p.dtype = q_in.dtype();
  p.batch = B;
  p.heads = H;
  p.q_len = Lq;
  p.k_len = Lk;
  p.head_dim = dh;
  p.q = q.t.raw_data();
  p.q_row = q.row;
  p.k = k.t.raw_data();
  p.k_row = k.row;
  p.v = v.t.raw_data();
  p.v_row = v.row;
  p.out = out.raw_data();
  p.lse = lse.raw_data();
  p.window = pattern.window;
  p.global_stride = pattern.global_stride;
  p.q_pos0 = q_pos0;
  p.k_pos0 = k_pos0;
  p.scale = scale;
  p.stream = current_stream(dev);
  if (out.numel() > 0) {
    const Tensor ws = HYDRA_CUDA_WORKSPACE(dev, attention_fwd_workspace, p);
    p.workspace = ws.defined() && ws.numel() > 0 ? ws.raw_data() : nullptr;
    HYDRA_LAUNCH(dev, attention_fwd, p);
    p.workspace = nullptr;  // scratch of the forward alone
  }
  if (any_requires_grad({q_in, k_in, v_in})) {
    std::vector<SavedTensor> saved = {SavedTensor(q.t), SavedTensor(k.t), SavedTensor(v.t),
                                      SavedTensor(out), SavedTensor(lse)};
    record_op("sparse_attention", {q_in, k_in, v_in}, {out, lse},
              [=](const std::vector<Tensor>& g) {
                for (const SavedTensor& s : saved) (void)s.get();
                const Tensor gout =
                    g[0].defined() ? g[0].contiguous() : zeros({B, Lq, H, dh}, p.dtype, dev);
                const Tensor glse = g.size() > 1 && g[1].defined()
                                        ? g[1].to(accumulate_dtype(p.dtype)).contiguous()
                                        : Tensor();
                Tensor gq = Tensor::empty({B, Lq, H, dh}, p.dtype, dev);
                Tensor gk = Tensor::empty({B, Lk, H, dh}, p.dtype, dev);
                Tensor gv = Tensor::empty({B, Lk, H, dh}, p.dtype, dev);
                kernels::AttentionBwdParams bp;
                bp.fwd = p;
                bp.fwd.stream = current_stream(dev);
                bp.gout = gout.raw_data();
                bp.glse = glse.defined() ? glse.raw_data() : nullptr;
                bp.gq = gq.raw_data();
                bp.gk = gk.raw_data();
                bp.gv = gv.raw_data();
                const Tensor ws = HYDRA_CUDA_WORKSPACE(dev, attention_bwd_workspace, bp);
                bp.workspace = ws.defined() ? ws.raw_data() : nullptr;
                if (gq.numel() > 0 || gk.numel() > 0) HYDRA_LAUNCH(dev, attention_bwd, bp);
                return std::vector<Tensor>{gq, gk, gv};
              });
  }
  return {out, lse};
}

Tensor sparse_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                        const AttentionPattern& pattern, double scale, int64_t q_pos0,
                        int64_t k_pos0) {
  return sparse_attention_with_lse(q, k, v, pattern, scale, q_pos0, k_pos0).first;
}

std::pair<Tensor, Tensor> merge_attention(const Tensor& outs_in, const Tensor& lses_in) {
  HYDRA_CHECK(outs_in.dim() == 5 && lses_in.dim() == 4)
      << "merge_attention: outs must be [P, B, L, H, dh] and lses [P, B, H, L], got "
      << shape_str(outs_in.shape()) << " and " << shape_str(lses_in.shape());
  const int64_t P = outs_in.size(0), B = outs_in.size(1), L = outs_in.size(2), H = outs_in.size(3),
                dh = outs_in.size(4);
  HYDRA_CHECK(lses_in.shape() == Shape({P, B, H, L}))
      << "merge_attention: outs " << shape_str(outs_in.shape()) << " need lses [" << P << ", " << B
      << ", " << H << ", " << L << "], got " << shape_str(lses_in.shape());
  HYDRA_CHECK(is_floating(outs_in.dtype()) && outs_in.device() == lses_in.device())
      << "merge_attention: floating outs and lses on one device expected";
  const DType dt = outs_in.dtype(), acc = accumulate_dtype(dt);
  const Device dev = outs_in.device();
  const Tensor outs = outs_in.contiguous(), lses = lses_in.to(acc).contiguous();
  Tensor o = Tensor::empty({B, L, H, dh}, dt, dev), lse = Tensor::empty({B, H, L}, acc, dev);
  kernels::MergeAttentionParams p;
  p.dtype = dt;
  p.parts = P;
  p.batch = B;
  p.len = L;
  p.heads = H;
  p.head_dim = dh;
  p.outs = outs.raw_data();
  p.lses = lses.raw_data();
  p.out = o.raw_data();
  p.lse = lse.raw_data();
  p.stream = current_stream(dev);
  if (lse.numel() > 0) HYDRA_LAUNCH(dev, merge_attention_fwd, p);
  if (any_requires_grad({outs_in, lses_in})) {
    std::vector<SavedTensor> saved = {SavedTensor(outs), SavedTensor(lses), SavedTensor(o),
                                      SavedTensor(lse)};
    record_op("merge_attention", {outs_in, lses_in}, {o, lse}, [=](const std::vector<Tensor>& g) {
      for (const SavedTensor& s : saved) (void)s.get();
      const Tensor go = g[0].defined() ? g[0].to(dt).contiguous() : Tensor();
      const Tensor gl = g.size() > 1 && g[1].defined() ? g[1].to(acc).contiguous() : Tensor();
      Tensor gouts = Tensor::empty({P, B, L, H, dh}, dt, dev),
             glses = Tensor::empty({P, B, H, L}, acc, dev);
      kernels::MergeAttentionBwdParams bp;
      bp.fwd = p;
      bp.fwd.stream = current_stream(dev);
      bp.gout = go.defined() ? go.raw_data() : nullptr;
      bp.glse = gl.defined() ? gl.raw_data() : nullptr;
      bp.gouts = gouts.raw_data();
      bp.glses = glses.raw_data();
      if (glses.numel() > 0) HYDRA_LAUNCH(dev, merge_attention_bwd, bp);
      return std::vector<Tensor>{gouts, glses};
    });
  }
  return {o, lse};
}

namespace {

Tensor rope_raw(const Tensor& x_in, int64_t pos0, double theta, bool inverse) {
  const TokenRows x = as_token_rows(x_in);
  Tensor y = Tensor::empty(x_in.shape(), x_in.dtype(), x_in.device());
  kernels::RopeParams p;
  p.dtype = x_in.dtype();
  p.x = x.t.raw_data();
  p.x_row = x.row;
  p.y = y.raw_data();
  p.batch = x_in.size(0);
  p.len = x_in.size(1);
  p.heads = x_in.size(2);
  p.head_dim = x_in.size(3);
  p.pos0 = pos0;
  p.theta = theta;
  p.inverse = inverse;
  p.stream = current_stream(x_in.device());
  if (y.numel() > 0) HYDRA_LAUNCH(x_in.device(), rope, p);
  return y;
}

}  // namespace

Tensor rope(const Tensor& x, int64_t pos0, double theta) {
  HYDRA_CHECK(x.dim() == 4 && x.size(3) % 2 == 0 && is_floating(x.dtype()))
      << "rope: x must be floating [B, L, H, dh] with even dh, got " << shape_str(x.shape());
  Tensor y = rope_raw(x, pos0, theta, false);
  record_op("rope", {x}, {y}, [pos0, theta](const std::vector<Tensor>& g) {
    return std::vector<Tensor>{
        rope_raw(g[0], pos0, theta, true)};  // a rotation's adjoint is its inverse
  });
  return y;
}

}  // namespace hydra
