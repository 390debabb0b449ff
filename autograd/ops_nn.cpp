#include <cstdint>

#include "autograd/dispatch.h"
#include "autograd/engine.h"
#include "autograd/node.h"
#include "autograd/ops.h"
#include "kernels/gated_residual.h"
#include "kernels/gated_update.h"
#include "kernels/loss.h"
#include "kernels/moe_aux.h"
#include "kernels/rms_norm.h"
#include "kernels/softmax.h"

namespace hydra {
namespace {

Tensor softmax_impl(const Tensor& x_in, bool log) {
  const char* name = log ? "log_softmax" : "softmax";
  HYDRA_CHECK(x_in.dim() >= 1 && is_floating(x_in.dtype()))
      << name << ": floating input with >= 1 dimension expected";
  Tensor x = x_in.contiguous();
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device());
  const int64_t cols = x.size(-1), rows = cols ? x.numel() / cols : 0;
  kernels::SoftmaxParams p;
  p.dtype = x.dtype();
  p.log = log;
  p.x = x.raw_data();
  p.y = y.raw_data();
  p.rows = rows;
  p.cols = cols;
  p.stream = current_stream(x.device());
  if (rows > 0 && cols > 0) HYDRA_LAUNCH(x.device(), softmax_fwd, p);
  if (any_requires_grad({x_in})) {
    SavedTensor sy(y);
    record_op(name, {x_in}, {y}, [sy, log, rows, cols](const std::vector<Tensor>& g) {
      Tensor yv = sy.get(), gy = g[0].contiguous();
      Tensor gx = Tensor::empty(yv.shape(), yv.dtype(), yv.device());
      kernels::SoftmaxBwdParams q;
      q.dtype = yv.dtype();
      q.log = log;
      q.y = yv.raw_data();
      q.gy = gy.raw_data();
      q.gx = gx.raw_data();
      q.rows = rows;
      q.cols = cols;
      q.stream = current_stream(yv.device());
      if (rows > 0 && cols > 0) HYDRA_LAUNCH(yv.device(), softmax_bwd, q);
      return std::vector<Tensor>{gx};
    });
  }
  return y;
}

}  // namespace

Tensor rms_norm(const Tensor& x_in, const Tensor& weight, double eps) {
  HYDRA_CHECK(x_in.dim() >= 1 && is_floating(x_in.dtype()))
      << "rms_norm: floating input with >= 1 dimension expected";
  const int64_t cols = x_in.size(-1);
  if (weight.defined()) {
    HYDRA_CHECK(weight.dim() == 1 && weight.size(0) == cols)
        << "rms_norm: weight " << shape_str(weight.shape()) << " does not match input "
        << shape_str(x_in.shape());
    HYDRA_CHECK(weight.dtype() == x_in.dtype() && weight.device() == x_in.device())
        << "rms_norm: weight and input differ in dtype or device";
  }
  Tensor x = x_in.contiguous();
  const int64_t rows = cols ? x.numel() / cols : 0;
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device());
  Tensor rstd = Tensor::empty({rows}, accumulate_dtype(x.dtype()), x.device());
  kernels::RmsNormParams p;
  p.dtype = x.dtype();
  p.x = x.raw_data();
  p.w = weight.defined() ? weight.contiguous().raw_data() : nullptr;
  p.y = y.raw_data();
  p.rstd = rstd.raw_data();
  p.rows = rows;
  p.cols = cols;
  p.eps = eps;
  p.stream = current_stream(x.device());
  if (rows > 0) HYDRA_LAUNCH(x.device(), rms_norm_fwd, p);
  if (any_requires_grad({x_in, weight})) {
    SavedTensor sx(x), sw(weight.defined() ? weight.contiguous() : Tensor()), sr(rstd);
    const bool need_w = weight.defined() && weight.requires_grad();
    record_op("rms_norm", {x_in, weight}, {y}, [=](const std::vector<Tensor>& g) {
      Tensor xv = sx.get(), wv = sw.get(), gy = g[0].contiguous();
      Tensor gx = Tensor::empty(xv.shape(), xv.dtype(), xv.device());
      Tensor gw = need_w ? Tensor::empty({cols}, xv.dtype(), xv.device()) : Tensor();
      kernels::RmsNormBwdParams q;
      q.dtype = xv.dtype();
      q.x = xv.raw_data();
      q.w = wv.defined() ? wv.raw_data() : nullptr;
      q.rstd = sr.get().raw_data();
      q.gy = gy.raw_data();
      q.gx = gx.raw_data();
      q.gw = need_w ? gw.raw_data() : nullptr;
      q.rows = rows;
      q.cols = cols;
      q.stream = current_stream(xv.device());
      const Tensor ws = HYDRA_CUDA_WORKSPACE(xv.device(), rms_norm_bwd_workspace, q);
      q.workspace = ws.defined() ? ws.raw_data() : nullptr;
      if (rows > 0) {
        HYDRA_LAUNCH(xv.device(), rms_norm_bwd, q);
      } else if (need_w) {
        gw.zero_();
      }
      return std::vector<Tensor>{gx, gw};
    });
  }
  return y;
}

namespace {
// A contiguous tensor whose data starts on a 16-byte boundary (the multi-norm's vector loads).
Tensor aligned_contiguous(const Tensor& t) {
  Tensor c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.raw_data()) % 16 == 0 ? c : c.clone();
}
}  // namespace

std::vector<Tensor> rms_norm_multi(const Tensor& x_in, const std::vector<Tensor>& weights,
                                   double eps) {
  const int count = static_cast<int>(weights.size());
  HYDRA_CHECK(count >= 1 && count <= kernels::kRmsNormMaxWeights)
      << "rms_norm_multi: 1 to " << kernels::kRmsNormMaxWeights << " weights, got " << count;
  HYDRA_CHECK(x_in.dim() >= 1 && is_floating(x_in.dtype()))
      << "rms_norm_multi: floating input with >= 1 dimension expected";
  const int64_t cols = x_in.size(-1);
  for (const Tensor& w : weights)
    HYDRA_CHECK(w.defined() && w.dim() == 1 && w.size(0) == cols && w.dtype() == x_in.dtype() &&
                w.device() == x_in.device())
        << "rms_norm_multi: weights [" << cols << "] of the input's dtype and device expected, got "
        << (w.defined() ? shape_str(w.shape()) : std::string("undefined"));
  bool fused = true;
#if HYDRA_WITH_CUDA
  fused = !x_in.device().is_cuda() ||
          kernels::cuda::rms_norm_multi_supported(x_in.dtype(), cols, count);
#endif
  if (!fused) {
    std::vector<Tensor> ys;
    ys.reserve(weights.size());
    for (const Tensor& w : weights) ys.push_back(rms_norm(x_in, w, eps));
    return ys;
  }
  const Tensor x = aligned_contiguous(x_in);
  const int64_t rows = cols ? x.numel() / cols : 0;
  std::vector<Tensor> ws, ys;
  Tensor rstd = Tensor::empty({rows}, accumulate_dtype(x.dtype()), x.device());
  kernels::RmsNormMultiParams p;
  p.dtype = x.dtype();
  p.x = x.raw_data();
  p.count = count;
  for (int k = 0; k < count; ++k) {
    ws.push_back(aligned_contiguous(weights[k].detach()));
    ys.push_back(Tensor::empty(x.shape(), x.dtype(), x.device()));
    p.w[k] = ws[k].raw_data();
    p.y[k] = ys[k].raw_data();
  }
  p.rstd = rstd.raw_data();
  p.rows = rows;
  p.cols = cols;
  p.eps = eps;
  p.stream = current_stream(x.device());
  if (rows > 0) HYDRA_LAUNCH(x.device(), rms_norm_multi_fwd, p);
  std::vector<Tensor> inputs = {x_in};
  inputs.insert(inputs.end(), weights.begin(), weights.end());
  if (any_requires_grad(inputs)) {
    SavedTensor sx(x), sr(rstd);
    std::vector<SavedTensor> sw;
    std::vector<bool> need_w;
    for (int k = 0; k < count; ++k) {
      sw.emplace_back(ws[k]);
      need_w.push_back(weights[k].requires_grad());
    }
    record_op("rms_norm_multi", inputs, ys, [=](const std::vector<Tensor>& g) {
      const Tensor xv = sx.get(), rv = sr.get();
      kernels::RmsNormMultiBwdParams q;
      q.dtype = xv.dtype();
      q.x = xv.raw_data();
      q.count = count;
      q.rstd = rv.raw_data();
      q.rows = rows;
      q.cols = cols;
      q.stream = current_stream(xv.device());
      std::vector<Tensor> keep, out(count + 1);
      // Added into x's gradient summed so far when the engine offers it (16-byte aligned: the
      // kernel reads rows in packs).
      out[0] =
          rows > 0 ? gradient_sum_target(0, xv.shape(), xv.dtype(), xv.device(), 16) : Tensor();
      q.accumulate_gx = out[0].defined();
      if (!q.accumulate_gx) out[0] = Tensor::empty(xv.shape(), xv.dtype(), xv.device());
      q.gx = out[0].raw_data();
      for (int k = 0; k < count; ++k) {
        const Tensor wv = sw[k].get();
        keep.push_back(wv);
        q.w[k] = wv.raw_data();
        if (g[k].defined()) {
          keep.push_back(aligned_contiguous(g[k]));
          q.gy[k] = keep.back().raw_data();
        }
        if (need_w[k] && g[k].defined()) {  // no gradient reached y_k: none for w_k, as rms_norm
          out[k + 1] = Tensor::empty({cols}, xv.dtype(), xv.device());
          q.gw[k] = out[k + 1].raw_data();
        }
      }
      const Tensor scratch_ws = HYDRA_CUDA_WORKSPACE(xv.device(), rms_norm_multi_bwd_workspace, q);
      q.workspace = scratch_ws.defined() ? scratch_ws.raw_data() : nullptr;
      if (rows > 0) {
        HYDRA_LAUNCH(xv.device(), rms_norm_multi_bwd, q);
      } else {
        for (int k = 0; k < count; ++k)
          if (out[k + 1].defined()) out[k + 1].zero_();
      }
      return out;
    });
  }
  return ys;
}

Tensor gated_residual(const Tensor& x_in, const std::vector<Tensor>& outs_in,
                      const std::vector<Tensor>& gates_in, const Tensor& mix_in) {
  const int paths = static_cast<int>(outs_in.size());
  HYDRA_CHECK(x_in.dim() >= 1 && is_floating(x_in.dtype()))
      << "gated_residual: x must be floating with >= 1 dimension, got " << shape_str(x_in.shape());
  HYDRA_CHECK(paths >= 1 && paths <= kernels::kGatedResidualMaxPaths &&
              gates_in.size() == outs_in.size())
      << "gated_residual: 1 to " << kernels::kGatedResidualMaxPaths
      << " paths with a gate each expected, got " << outs_in.size() << " outputs and "
      << gates_in.size() << " gates";
  const int64_t cols = x_in.size(-1), rows = cols ? x_in.numel() / cols : 0;
  for (int i = 0; i < paths; ++i) {
    HYDRA_CHECK(outs_in[i].shape() == x_in.shape() && gates_in[i].shape() == Shape{cols})
        << "gated_residual: path " << i << " has output " << shape_str(outs_in[i].shape())
        << " and gate " << shape_str(gates_in[i].shape()) << " for x " << shape_str(x_in.shape())
        << " (expected the output shaped as x and a gate [" << cols << "])";
    HYDRA_CHECK(outs_in[i].dtype() == x_in.dtype() && gates_in[i].dtype() == x_in.dtype() &&
                outs_in[i].device() == x_in.device() && gates_in[i].device() == x_in.device())
        << "gated_residual: path " << i << " differs from x in dtype or device";
  }
  if (mix_in.defined()) {
    Shape want = x_in.shape();
    want.back() = paths;
    HYDRA_CHECK(mix_in.shape() == want && mix_in.dtype() == x_in.dtype() &&
                mix_in.device() == x_in.device())
        << "gated_residual: mix " << shape_str(mix_in.shape()) << " expected " << shape_str(want)
        << " of x's dtype and device";
  }
  std::vector<Tensor> outs, gates;
  for (int i = 0; i < paths; ++i) {
    outs.push_back(outs_in[i].contiguous());
    gates.push_back(gates_in[i].contiguous());
  }
  const Tensor x = x_in.contiguous(), mix = mix_in.defined() ? mix_in.contiguous() : Tensor();
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device());
  kernels::GatedResidualParams p;
  p.dtype = x.dtype();
  p.x = x.raw_data();
  for (int i = 0; i < paths; ++i) {
    p.outs[i] = outs[i].raw_data();
    p.gates[i] = gates[i].raw_data();
  }
  p.mix = mix.defined() ? mix.raw_data() : nullptr;
  p.paths = paths;
  p.rows = rows;
  p.cols = cols;
  p.y = y.raw_data();
  p.stream = current_stream(x.device());
  if (y.numel() > 0) HYDRA_LAUNCH(x.device(), gated_residual_fwd, p);

  std::vector<Tensor> inputs = {x_in};
  inputs.insert(inputs.end(), outs_in.begin(), outs_in.end());
  inputs.insert(inputs.end(), gates_in.begin(), gates_in.end());
  inputs.push_back(mix_in);
  if (!any_requires_grad(inputs)) return y;
  std::vector<bool> need_out, need_gate;
  std::vector<SavedTensor> saved_outs, saved_gates;
  for (int i = 0; i < paths; ++i) {
    need_out.push_back(outs_in[i].requires_grad());
    need_gate.push_back(gates_in[i].requires_grad());
    saved_outs.emplace_back(outs[i]);
    saved_gates.emplace_back(gates[i]);
  }
  const bool need_mix = mix.defined() && mix_in.requires_grad();
  const SavedTensor saved_mix(mix);
  record_op("gated_residual", inputs, {y}, [=](const std::vector<Tensor>& g) {
    const Tensor gy = g[0].contiguous();
    const Device dev = gy.device();
    std::vector<Tensor> kept;  // the saved tensors, alive while the kernels read them
    kernels::GatedResidualBwdParams q;
    q.fwd = p;
    q.fwd.x = nullptr;
    q.fwd.y = nullptr;
    q.fwd.stream = current_stream(dev);
    q.gy = gy.raw_data();
    std::vector<Tensor> grads = {gy};  // the residual's gradient is gy itself
    std::vector<Tensor> ggates(paths);
    for (int i = 0; i < paths; ++i) {
      kept.push_back(saved_outs[i].get());
      kept.push_back(saved_gates[i].get());
      q.fwd.outs[i] = kept[kept.size() - 2].raw_data();
      q.fwd.gates[i] = kept.back().raw_data();
      Tensor go = need_out[i] ? Tensor::empty(gy.shape(), gy.dtype(), dev) : Tensor();
      q.gouts[i] = go.defined() ? go.raw_data() : nullptr;
      grads.push_back(go);
      if (need_gate[i]) ggates[i] = Tensor::empty({cols}, gy.dtype(), dev);
      q.ggates[i] = ggates[i].defined() ? ggates[i].raw_data() : nullptr;
    }
    grads.insert(grads.end(), ggates.begin(), ggates.end());
    const Tensor mv = saved_mix.get();
    q.fwd.mix = mv.defined() ? mv.raw_data() : nullptr;
    Tensor gmix;
    if (need_mix) gmix = Tensor::empty(mv.shape(), gy.dtype(), dev);
    q.gmix = gmix.defined() ? gmix.raw_data() : nullptr;
    grads.push_back(gmix);
    const Tensor ws = HYDRA_CUDA_WORKSPACE(dev, gated_residual_bwd_workspace, q);
    q.workspace = ws.defined() ? ws.raw_data() : nullptr;
    if (rows > 0 && cols > 0) {
      HYDRA_LAUNCH(dev, gated_residual_bwd, q);
    } else {
      for (Tensor& t : ggates)
        if (t.defined()) t.zero_();
    }
    return grads;
  });
  return y;
}

std::pair<Tensor, Tensor> gated_update(const Tensor& s_in, const Tensor& u_in, const Tensor& w_in,
                                       const Tensor& b_in) {
  HYDRA_CHECK(s_in.dim() >= 1 && s_in.shape() == u_in.shape() && is_floating(s_in.dtype()))
      << "gated_update: s " << shape_str(s_in.shape()) << " and u " << shape_str(u_in.shape())
      << " must be floating tensors of one shape";
  const int64_t n = s_in.size(-1);
  HYDRA_CHECK(w_in.numel() == 2 * n && b_in.numel() == 1)
      << "gated_update: gate weight " << shape_str(w_in.shape()) << " and bias "
      << shape_str(b_in.shape()) << " for rows of " << n << " (expected 2 * " << n
      << " weights and one bias)";
  const DType dt = s_in.dtype();
  const Device dev = s_in.device();
  for (const Tensor* t : {&u_in, &w_in, &b_in})
    HYDRA_CHECK(t->dtype() == dt && t->device() == dev)
        << "gated_update: operands differ in dtype or device";
  const Tensor s = s_in.contiguous(), u = u_in.contiguous(), w = w_in.contiguous(),
               b = b_in.contiguous();
  const int64_t rows = n ? s.numel() / n : 0;
  Tensor out = Tensor::empty(s.shape(), dt, dev), gate = Tensor::empty({rows}, dt, dev);
  kernels::GatedUpdateParams p;
  p.dtype = dt;
  p.rows = rows;
  p.cols = n;
  p.s = s.raw_data();
  p.u = u.raw_data();
  p.w = w.raw_data();
  p.b = b.raw_data();
  p.out = out.raw_data();
  p.gate = gate.raw_data();
  p.stream = current_stream(dev);
  if (rows > 0) HYDRA_LAUNCH(dev, gated_update_fwd, p);
  if (any_requires_grad({s_in, u_in, w_in, b_in})) {
    const SavedTensor ss(s), su(u), sw(w), sg(gate);
    const bool need_w = w_in.requires_grad(), need_b = b_in.requires_grad();
    const Shape& w_shape = w_in.shape();
    const Shape& b_shape = b_in.shape();
    record_op("gated_update", {s_in, u_in, w_in, b_in}, {out}, [=](const std::vector<Tensor>& g) {
      const Tensor sv = ss.get(), uv = su.get(), go = g[0].contiguous();
      Tensor gs = Tensor::empty(sv.shape(), dt, dev), gu = Tensor::empty(sv.shape(), dt, dev);
      Tensor gz = Tensor::empty({rows}, accumulate_dtype(dt), dev);
      kernels::GatedUpdateBwdParams q;
      q.fwd = p;
      q.fwd.s = sv.raw_data();
      q.fwd.u = uv.raw_data();
      q.fwd.w = sw.get().raw_data();
      q.fwd.gate = sg.get().raw_data();
      q.fwd.stream = current_stream(dev);
      q.gout = go.raw_data();
      q.gs = gs.raw_data();
      q.gu = gu.raw_data();
      q.gz = gz.raw_data();
      Tensor gw = need_w ? Tensor::empty(w_shape, dt, dev) : Tensor();
      Tensor gb = need_b ? Tensor::empty(b_shape, dt, dev) : Tensor();
      q.gw = need_w ? gw.raw_data() : nullptr;
      q.gb = need_b ? gb.raw_data() : nullptr;
      const Tensor ws = HYDRA_CUDA_WORKSPACE(dev, gated_update_bwd_workspace, q);
      q.workspace = ws.defined() ? ws.raw_data() : nullptr;
      if (rows > 0) {
        HYDRA_LAUNCH(dev, gated_update_bwd, q);
      } else {
        if (need_w) gw.zero_();
        if (need_b) gb.zero_();
      }
      return std::vector<Tensor>{gs, gu, gw, gb};
    });
  }
  Shape gate_shape = s.shape();
  gate_shape.back() = 1;
  return {out, gate.view(gate_shape)};
}

std::pair<Tensor, Tensor> gated_scan(const Tensor& s_in, const Tensor& u_in, const Tensor& w_in,
                                     const Tensor& b_in) {
  HYDRA_CHECK(s_in.dim() == 2 && u_in.dim() == 3 && u_in.size(1) == s_in.size(0) &&
              u_in.size(2) == s_in.size(1) && is_floating(s_in.dtype()))
      << "gated_scan: s " << shape_str(s_in.shape()) << " and u " << shape_str(u_in.shape())
      << " must be floating tensors [R, n] and [T, R, n]";
  const int64_t T = u_in.size(0), R = s_in.size(0), n = s_in.size(1);
  HYDRA_CHECK(w_in.numel() == 2 * n && b_in.numel() == 1)
      << "gated_scan: gate weight " << shape_str(w_in.shape()) << " and bias "
      << shape_str(b_in.shape()) << " for rows of " << n << " (expected 2 * " << n
      << " weights and one bias)";
  const DType dt = s_in.dtype();
  const Device dev = s_in.device();
  for (const Tensor* t : {&u_in, &w_in, &b_in})
    HYDRA_CHECK(t->dtype() == dt && t->device() == dev)
        << "gated_scan: operands differ in dtype or device";
  const Tensor s = s_in.contiguous(), u = u_in.contiguous(), w = w_in.contiguous(),
               b = b_in.contiguous();
  Tensor h = Tensor::empty({T + 1, R, n}, dt, dev), gate = Tensor::empty({T, R}, dt, dev);
  kernels::GatedScanParams p;
  p.dtype = dt;
  p.steps = T;
  p.rows = R;
  p.cols = n;
  p.s = s.raw_data();
  p.u = u.raw_data();
  p.w = w.raw_data();
  p.b = b.raw_data();
  p.h = h.raw_data();
  p.gate = gate.raw_data();
  p.stream = current_stream(dev);
  if (R > 0 && n > 0) HYDRA_LAUNCH(dev, gated_scan_fwd, p);
  if (any_requires_grad({s_in, u_in, w_in, b_in})) {
    const SavedTensor su(u), sw(w), sh(h), sg(gate);
    const bool need_w = w_in.requires_grad(), need_b = b_in.requires_grad();
    const Shape& w_shape = w_in.shape();
    const Shape& b_shape = b_in.shape();
    record_op("gated_scan", {s_in, u_in, w_in, b_in}, {h}, [=](const std::vector<Tensor>& g) {
      const Tensor uv = su.get(), gh = g[0].contiguous();
      Tensor gs = Tensor::empty({R, n}, dt, dev), gu = Tensor::empty({T, R, n}, dt, dev);
      Tensor lambda = Tensor::empty({R, n}, accumulate_dtype(dt), dev);
      Tensor gz = Tensor::empty({T, R}, accumulate_dtype(dt), dev);
      kernels::GatedScanBwdParams q;
      q.fwd = p;
      q.fwd.u = uv.raw_data();
      q.fwd.w = sw.get().raw_data();
      q.fwd.h = sh.get().raw_data();
      q.fwd.gate = sg.get().raw_data();
      q.fwd.stream = current_stream(dev);
      q.gh = gh.raw_data();
      q.gs = gs.raw_data();
      q.gu = gu.raw_data();
      q.lambda = lambda.raw_data();
      q.gz = gz.raw_data();
      Tensor gw = need_w ? Tensor::empty(w_shape, dt, dev) : Tensor();
      Tensor gb = need_b ? Tensor::empty(b_shape, dt, dev) : Tensor();
      q.gw = need_w ? gw.raw_data() : nullptr;
      q.gb = need_b ? gb.raw_data() : nullptr;
      const Tensor ws = HYDRA_CUDA_WORKSPACE(dev, gated_scan_bwd_workspace, q);
      q.workspace = ws.defined() ? ws.raw_data() : nullptr;
      if (R > 0 && n > 0) HYDRA_LAUNCH(dev, gated_scan_bwd, q);
      if (R == 0 || n == 0 || T == 0) {  // no (step, row) pairs: the gate's sums are empty
        if (need_w) gw.zero_();
        if (need_b) gb.zero_();
      }
      if (R == 0 || n == 0) {
        gs.zero_();
        gu.zero_();
      }
      return std::vector<Tensor>{gs, gu, gw, gb};
    });
  }
  return {h, gate};
}

Tensor softmax(const Tensor& x) { return softmax_impl(x, false); }
Tensor log_softmax(const Tensor& x) { return softmax_impl(x, true); }

Tensor cross_entropy(const Tensor& logits_in, const Tensor& targets_in, int64_t ignore_index,
                     Reduction reduction) {
  HYDRA_CHECK(logits_in.dim() >= 1 && is_floating(logits_in.dtype()))
      << "cross_entropy: floating logits expected";
  HYDRA_CHECK(is_integral(targets_in.dtype()))
      << "cross_entropy: targets must be i32 or i64, got " << dtype_name(targets_in.dtype());
  const int64_t V = logits_in.size(-1);
  Shape row_shape(logits_in.shape().begin(), logits_in.shape().end() - 1);
  HYDRA_CHECK(targets_in.shape() == row_shape)
      << "cross_entropy: targets " << shape_str(targets_in.shape()) << " do not match logits "
      << shape_str(logits_in.shape()) << " (expected " << shape_str(row_shape) << ")";
  HYDRA_CHECK(targets_in.device() == logits_in.device())
      << "cross_entropy: logits and targets on different devices";
  Tensor logits = logits_in.contiguous(), targets = targets_in.contiguous();
  const int64_t rows = shape_numel(row_shape);
  // Targets are checked by the kernels, on the device where they are: the CPU kernel fails naming a
  // target outside the vocabulary; the CUDA kernel makes that row's loss NaN (kernels/loss.h),
  // which the trainer stops on, since a check on the host would stop it until the logits exist. The
  // data pipeline checks token ids against the vocabulary before they get here.
  const DType acc = accumulate_dtype(logits.dtype());
  Tensor loss_rows = Tensor::empty({rows}, acc, logits.device());
  Tensor lse = Tensor::empty({rows}, acc, logits.device());
  kernels::CrossEntropyParams p;
  p.dtype = logits.dtype();
  p.target_dtype = targets.dtype();
  p.logits = logits.raw_data();
  p.targets = targets.raw_data();
  p.loss = loss_rows.raw_data();
  p.lse = lse.raw_data();
  Tensor counted;  // mean: 1 per counted row
  if (reduction == Reduction::kMean) {
    counted = Tensor::empty({rows}, acc, logits.device());
    p.counted = counted.raw_data();
  }
  p.rows = rows;
  p.vocab = V;
  p.ignore_index = ignore_index;
  p.stream = current_stream(logits.device());
  if (rows > 0) HYDRA_LAUNCH(logits.device(), cross_entropy_fwd, p);

  Tensor out, inv_count;  // inv_count: the mean's 1 / max(count, 1), [1]
  if (reduction == Reduction::kNone) {
    out = loss_rows.view(row_shape);
  } else if (reduction == Reduction::kMean) {
    out = Tensor::empty({}, acc, logits.device());
    inv_count = Tensor::empty({1}, acc, logits.device());
    kernels::CrossEntropyMeanParams mp;
    mp.dtype = acc;
    mp.loss = loss_rows.raw_data();
    mp.counted = counted.raw_data();
    mp.out = out.raw_data();
    mp.inv = inv_count.raw_data();
    mp.rows = rows;
    mp.stream = p.stream;
    HYDRA_LAUNCH(logits.device(), cross_entropy_mean, mp);
  } else {
    out = sum(loss_rows).to(acc).detach();
  }
  if (any_requires_grad({logits_in})) {
    SavedTensor sl(logits), st(targets), slse(lse);
    record_op("cross_entropy", {logits_in}, {out}, [=](const std::vector<Tensor>& g) {
      Tensor grow;  // per-row upstream gradient, accumulate dtype
      if (reduction == Reduction::kNone) {
        grow = g[0].reshape({rows}).to(acc).contiguous();
      } else if (reduction == Reduction::kMean) {
        grow = mul(g[0].to(acc).reshape({1}), inv_count).expand({rows}).contiguous();
      } else {
        grow = g[0].to(acc).reshape({1}).expand({rows}).contiguous();
      }
      Tensor lv = sl.get();
      Tensor gl = Tensor::empty(lv.shape(), lv.dtype(), lv.device());
      kernels::CrossEntropyBwdParams q;
      q.dtype = lv.dtype();
      q.target_dtype = st.get().dtype();
      q.logits = lv.raw_data();
      q.targets = st.get().raw_data();
      q.lse = slse.get().raw_data();
      q.grow = grow.raw_data();
      q.glogits = gl.raw_data();
      q.rows = rows;
      q.vocab = V;
      q.ignore_index = ignore_index;
      q.stream = current_stream(lv.device());
      if (rows > 0) HYDRA_LAUNCH(lv.device(), cross_entropy_bwd, q);
      return std::vector<Tensor>{gl};
    });
  }
  return out;
}

Tensor moe_aux(const Tensor& raw_in, const Tensor& s_in, const Tensor& r_in, const Tensor& load_in,
               const Tensor& z_next_in, const MoeAuxOptions& o) {
  HYDRA_CHECK(raw_in.dim() == 3 && s_in.shape() == raw_in.shape() && r_in.shape() == raw_in.shape())
      << "moe_aux: raw, s and r [batch, chunks, experts] expected, got "
      << shape_str(raw_in.shape()) << ", " << shape_str(s_in.shape()) << ", "
      << shape_str(r_in.shape());
  const int64_t B = raw_in.size(0), nC = raw_in.size(1), E = raw_in.size(2);
  HYDRA_CHECK(load_in.shape() == Shape{E})
      << "moe_aux: load [" << E << "] expected, got " << shape_str(load_in.shape());
  HYDRA_CHECK(!z_next_in.defined() || z_next_in.shape() == (Shape{B, E}))
      << "moe_aux: z_next [" << B << ", " << E << "] expected, got "
      << shape_str(z_next_in.shape());
  HYDRA_CHECK(o.group >= 1 && o.chunk_len >= 1)
      << "moe_aux: group and chunk_len must be >= 1, got " << o.group << ", " << o.chunk_len;
  for (const Tensor* t : {&s_in, &r_in, &load_in, &z_next_in})
    HYDRA_CHECK(!t->defined() || (t->dtype() == raw_in.dtype() && t->device() == raw_in.device()))
        << "moe_aux: the inputs differ in dtype or device";
  const Tensor raw = raw_in.contiguous(), s = s_in.contiguous(), r = r_in.contiguous(),
               load = load_in.detach().contiguous(),
               zn = z_next_in.defined() ? z_next_in.detach().contiguous() : Tensor();
  kernels::MoeAuxParams p;
  p.dtype = raw.dtype();
  p.batch = B;
  p.chunks = nC;
  p.experts = E;
  p.chunk_len = o.chunk_len;
  p.group = o.group;
  p.alpha = o.alpha;
  p.balance_scale = o.balance_scale;
  p.locality_scale = o.locality_scale;
  p.sparsity_scale = o.sparsity_scale;
  for (int k = 0; k < 3; ++k) p.weights[k] = o.weights[k];
  p.raw = raw.raw_data();
  p.s = s.raw_data();
  p.r = r.raw_data();
  p.load = load.raw_data();
  p.z_next = zn.defined() ? zn.raw_data() : nullptr;
  p.stream = current_stream(raw.device());
  Tensor out = Tensor::empty({2, 3}, raw.dtype(), raw.device());
  p.out = out.raw_data();
  {
    const Tensor ws = HYDRA_CUDA_WORKSPACE(raw.device(), moe_aux_workspace, p);
    p.workspace = ws.defined() ? ws.raw_data() : nullptr;
    HYDRA_LAUNCH(raw.device(), moe_aux_fwd, p);
  }
  if (any_requires_grad({raw_in, s_in, r_in})) {
    SavedTensor sraw(raw), ss(s), sr(r), sl(load), szn(zn);
    record_op("moe_aux", {raw_in, s_in, r_in}, {out}, [=](const std::vector<Tensor>& g) {
      const Tensor rv = sraw.get(), sv = ss.get(), qv = sr.get(), lv = sl.get(), zv = szn.get();
      const Tensor go = g[0].contiguous();
      Tensor graw = Tensor::empty(rv.shape(), rv.dtype(), rv.device()),
             gs = Tensor::empty(rv.shape(), rv.dtype(), rv.device()),
             gr = Tensor::empty(rv.shape(), rv.dtype(), rv.device());
      kernels::MoeAuxBwdParams q;
      q.fwd = p;
      q.fwd.raw = rv.raw_data();
      q.fwd.s = sv.raw_data();
      q.fwd.r = qv.raw_data();
      q.fwd.load = lv.raw_data();
      q.fwd.z_next = zv.defined() ? zv.raw_data() : nullptr;
      q.fwd.out = nullptr;
      q.fwd.workspace = nullptr;
      q.fwd.stream = current_stream(rv.device());
      q.gout = go.raw_data();
      q.graw = graw.raw_data();
      q.gs = gs.raw_data();
      q.gr = gr.raw_data();
      const Tensor ws = HYDRA_CUDA_WORKSPACE(rv.device(), moe_aux_bwd_workspace, q);
      q.workspace = ws.defined() ? ws.raw_data() : nullptr;
      HYDRA_LAUNCH(rv.device(), moe_aux_bwd, q);
      return std::vector<Tensor>{graw, gs, gr};
    });
  }
  return out;
}

}  // namespace hydra
