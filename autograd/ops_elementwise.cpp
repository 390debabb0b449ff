#include <algorithm>
#include <optional>
#include <string>

#include "autograd/dispatch.h"
#include "autograd/grad_mode.h"
#include "autograd/node.h"
#include "autograd/ops.h"
#include "kernels/elementwise.h"

namespace hydra {
namespace {

using kernels::BinaryOp;
using kernels::UnaryOp;

void check_pair(const char* op, const Tensor& a, const Tensor& b) {
  HYDRA_CHECK(a.defined() && b.defined()) << op << ": undefined operand";
  HYDRA_CHECK(a.device() == b.device())
      << op << ": operands on " << a.device().str() << " and " << b.device().str();
  HYDRA_CHECK(a.dtype() == b.dtype())
      << op << ": operand dtypes " << dtype_name(a.dtype()) << " and " << dtype_name(b.dtype())
      << " differ (convert one with to())";
  HYDRA_CHECK(is_floating(a.dtype()))
      << op << ": floating operands expected, got " << dtype_name(a.dtype());
}

// Strides of `t` seen through broadcasting to `out` (0 along broadcast dimensions).
Shape broadcast_strides(const Tensor& t, const Shape& out) {
  const int64_t n = t.dim(), m = static_cast<int64_t>(out.size());
  Shape st(m, 0);
  for (int64_t i = 0; i < m; ++i) {
    const int64_t j = i - (m - n);
    if (j >= 0 && t.shape()[j] != 1) st[i] = t.strides()[j];
  }
  return st;
}

// Merges adjacent dimensions that are contiguous in every operand and drops size-1 dimensions.
void coalesce(Shape& shape, std::vector<Shape*> strides) {
  Shape s;
  std::vector<Shape> st(strides.size());
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == 1) continue;
    bool merge = !s.empty();
    for (std::size_t k = 0; k < strides.size() && merge; ++k)
      merge = st[k].back() == (*strides[k])[i] * shape[i];
    if (merge) {
      s.back() *= shape[i];
      for (std::size_t k = 0; k < strides.size(); ++k) st[k].back() = (*strides[k])[i];
    } else {
      s.push_back(shape[i]);
      for (std::size_t k = 0; k < strides.size(); ++k) st[k].push_back((*strides[k])[i]);
    }
  }
  shape = s;
  for (std::size_t k = 0; k < strides.size(); ++k) *strides[k] = st[k];
}

// out = a (op) b, broadcasting; `out` must be contiguous with the broadcast shape.
void launch_binary(BinaryOp op, const Tensor& a, const Tensor& b, const Tensor& out) {
  if (out.numel() == 0) return;
  Shape shape = out.shape();
  Shape sa = broadcast_strides(a, shape), sb = broadcast_strides(b, shape);
  coalesce(shape, {&sa, &sb});
  HYDRA_CHECK(static_cast<int>(shape.size()) <= kernels::kMaxDims)
      << "binary op: too many dimensions";
  kernels::BinaryParams p;
  p.op = op;
  p.dtype = out.dtype();
  p.a = a.raw_data();
  p.b = b.raw_data();
  p.out = out.raw_data();
  p.ndim = static_cast<int>(shape.size());
  for (int i = 0; i < p.ndim; ++i) {
    p.shape[i] = shape[i];
    p.a_strides[i] = sa[i];
    p.b_strides[i] = sb[i];
  }
  p.stream = current_stream(out.device());
  std::optional<KernelProfileScope> detail;
  if (kernel_profile_detailed()) {
    std::string bcast;  // per dim: a and b read along it (1) or broadcast (0)
    for (int i = 0; i < p.ndim; ++i)
      bcast += std::string(p.a_strides[i] ? "1" : "0") + (p.b_strides[i] ? "1" : "0") + " ";
    detail.emplace(out.device(), "binary op" + std::to_string(static_cast<int>(op)) + " " +
                                     std::string(dtype_name(p.dtype)) + " " +
                                     profile_dims(p.shape, p.ndim) + " ab " + bcast);
  }
  HYDRA_LAUNCH(out.device(), binary, p);
}

Tensor binary_forward(BinaryOp op, const char* name, const Tensor& a, const Tensor& b) {
  check_pair(name, a, b);
  Tensor out = Tensor::empty(broadcast_shapes(a.shape(), b.shape(), name), a.dtype(), a.device());
  launch_binary(op, a, b, out);
  return out;
}

Tensor unary_forward(UnaryOp op, const Tensor& x_in, double alpha = 1, double beta = 0) {
  HYDRA_CHECK(is_floating(x_in.dtype()))
      << "elementwise op on a " << dtype_name(x_in.dtype()) << " tensor";
  Tensor x = x_in.contiguous();
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device());
  if (y.numel() == 0) return y;
  kernels::UnaryParams p;
  p.op = op;
  p.dtype = x.dtype();
  p.x = x.raw_data();
  p.y = y.raw_data();
  p.n = x.numel();
  p.alpha = alpha;
  p.beta = beta;
  p.stream = current_stream(x.device());
  HYDRA_LAUNCH(x.device(), unary_fwd, p);
  return y;
}

Tensor unary_backward(UnaryOp op, const Tensor& x, const Tensor& y, const Tensor& g_in,
                      double alpha, double beta) {
  Tensor g = g_in.contiguous();
  Tensor gx = Tensor::empty(g.shape(), g.dtype(), g.device());
  if (gx.numel() == 0) return gx;
  kernels::UnaryBwdParams p;
  p.op = op;
  p.dtype = g.dtype();
  p.x = x.defined() ? x.raw_data() : nullptr;
  p.y = y.defined() ? y.raw_data() : nullptr;
  p.gy = g.raw_data();
  p.gx = gx.raw_data();
  p.n = g.numel();
  p.alpha = alpha;
  p.beta = beta;
  p.stream = current_stream(g.device());
  HYDRA_LAUNCH(g.device(), unary_bwd, p);
  return gx;
}

enum class Saves { kNone, kInput, kOutput };

Tensor unary_op(UnaryOp op, const char* name, Saves saves, const Tensor& x, double alpha = 1,
                double beta = 0) {
  Tensor y = unary_forward(op, x, alpha, beta);
  if (any_requires_grad({x})) {
    const Tensor xc = x.contiguous();
    SavedTensor sx(saves == Saves::kInput ? xc : Tensor());
    SavedTensor sy(saves == Saves::kOutput ? y : Tensor());
    record_op(name, {x}, {y}, [op, sx, sy, alpha, beta](const std::vector<Tensor>& g) {
      return std::vector<Tensor>{unary_backward(op, sx.get(), sy.get(), g[0], alpha, beta)};
    });
  }
  return y;
}

}  // namespace

Shape broadcast_shapes(const Shape& a, const Shape& b, const char* op) {
  const std::size_t n = std::max(a.size(), b.size());
  Shape out(n);
  for (std::size_t i = 0; i < n; ++i) {
    const int64_t da = i + a.size() >= n ? a[i + a.size() - n] : 1;
    const int64_t db = i + b.size() >= n ? b[i + b.size() - n] : 1;
    HYDRA_CHECK(da == db || da == 1 || db == 1)
        << op << ": shapes " << shape_str(a) << " and " << shape_str(b) << " do not broadcast";
    out[i] = da == 1 ? db : da;
  }
  return out;
}

Tensor add(const Tensor& a, const Tensor& b) {
  Tensor out = binary_forward(BinaryOp::kAdd, "add", a, b);
  const Shape& sa = a.shape();
  const Shape& sb = b.shape();
  record_op("add", {a, b}, {out}, [sa, sb](const std::vector<Tensor>& g) {
    return std::vector<Tensor>{sum_to(g[0], sa), sum_to(g[0], sb)};
  });
  return out;
}

Tensor sub(const Tensor& a, const Tensor& b) {
  Tensor out = binary_forward(BinaryOp::kSub, "sub", a, b);
  const Shape& sa = a.shape();
  const Shape& sb = b.shape();
  const bool need_b = b.requires_grad();
  record_op("sub", {a, b}, {out}, [sa, sb, need_b](const std::vector<Tensor>& g) {
    return std::vector<Tensor>{sum_to(g[0], sa), need_b ? sum_to(neg(g[0]), sb) : Tensor()};
  });
  return out;
}

Tensor mul(const Tensor& a, const Tensor& b) {
  Tensor out = binary_forward(BinaryOp::kMul, "mul", a, b);
  if (any_requires_grad({a, b})) {
    const bool need_a = a.requires_grad(), need_b = b.requires_grad();
    SavedTensor sa(need_b ? a : Tensor()), sb(need_a ? b : Tensor());
    const Shape& shape_a = a.shape();
    const Shape& shape_b = b.shape();
    record_op("mul", {a, b}, {out}, [=](const std::vector<Tensor>& g) {
      return std::vector<Tensor>{need_a ? sum_to(mul(g[0], sb.get()), shape_a) : Tensor(),
                                 need_b ? sum_to(mul(g[0], sa.get()), shape_b) : Tensor()};
    });
  }
  return out;
}

Tensor div(const Tensor& a, const Tensor& b) {
  Tensor out = binary_forward(BinaryOp::kDiv, "div", a, b);
  if (any_requires_grad({a, b})) {
    const bool need_b = b.requires_grad();
    SavedTensor sb(b), sout(need_b ? out : Tensor());
    const Shape& shape_a = a.shape();
    const Shape& shape_b = b.shape();
    record_op("div", {a, b}, {out}, [=](const std::vector<Tensor>& g) {
      const Tensor bv = sb.get();
      const Tensor ga = div(g[0], bv);
      // d(a/b)/db = -(a/b)/b
      return std::vector<Tensor>{sum_to(ga, shape_a),
                                 need_b ? sum_to(neg(mul(ga, sout.get())), shape_b) : Tensor()};
    });
  }
  return out;
}

Tensor affine(const Tensor& x, double alpha, double beta) {
  return unary_op(UnaryOp::kAffine, "affine", Saves::kNone, x, alpha, beta);
}
Tensor add(const Tensor& a, double b) { return affine(a, 1.0, b); }
Tensor mul(const Tensor& a, double b) { return affine(a, b, 0.0); }
Tensor neg(const Tensor& x) { return unary_op(UnaryOp::kNeg, "neg", Saves::kNone, x); }
Tensor exp(const Tensor& x) { return unary_op(UnaryOp::kExp, "exp", Saves::kOutput, x); }
Tensor log(const Tensor& x) { return unary_op(UnaryOp::kLog, "log", Saves::kInput, x); }
Tensor sigmoid(const Tensor& x) {
  return unary_op(UnaryOp::kSigmoid, "sigmoid", Saves::kOutput, x);
}
Tensor silu(const Tensor& x) { return unary_op(UnaryOp::kSilu, "silu", Saves::kInput, x); }
Tensor softplus(const Tensor& x) {
  return unary_op(UnaryOp::kSoftplus, "softplus", Saves::kInput, x);
}
Tensor gelu(const Tensor& x) { return unary_op(UnaryOp::kGelu, "gelu", Saves::kInput, x); }
Tensor relu(const Tensor& x) { return unary_op(UnaryOp::kRelu, "relu", Saves::kInput, x); }
Tensor sqrt(const Tensor& x) { return unary_op(UnaryOp::kSqrt, "sqrt", Saves::kOutput, x); }
Tensor rsqrt(const Tensor& x) { return unary_op(UnaryOp::kRsqrt, "rsqrt", Saves::kOutput, x); }
Tensor square(const Tensor& x) { return unary_op(UnaryOp::kSquare, "square", Saves::kInput, x); }
Tensor tanh(const Tensor& x) { return unary_op(UnaryOp::kTanh, "tanh", Saves::kOutput, x); }
Tensor pow(const Tensor& x, double exponent) {
  return unary_op(UnaryOp::kPow, "pow", Saves::kInput, x, exponent);
}

Tensor& Tensor::add_(const Tensor& other, double alpha) {
  HYDRA_CHECK(!(GradMode::enabled() && requires_grad()))
      << "add_: in-place change of a tensor that requires grad; do it under NoGradGuard";
  HYDRA_CHECK(is_contiguous()) << "add_: the destination must be contiguous";
  check_pair("add_", *this, other);
  HYDRA_CHECK(broadcast_shapes(shape(), other.shape(), "add_") == shape())
      << "add_: " << shape_str(other.shape()) << " does not broadcast to " << shape_str(shape());
  const Tensor o = alpha == 1.0 ? other.detach() : mul(other.detach(), alpha);
  launch_binary(BinaryOp::kAdd, *this, o,
                *this);  // elementwise, so reading and writing *this is safe
  storage()->bump_version();
  return *this;
}

}  // namespace hydra
