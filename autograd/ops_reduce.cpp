#include <algorithm>
#include <cmath>
#include <optional>
#include <set>
#include <string>

#include "autograd/dispatch.h"
#include "autograd/engine.h"
#include "autograd/node.h"
#include "autograd/ops.h"
#include "kernels/reduce.h"

namespace hydra {
namespace {

using kernels::ReduceOp;

// Reduces axes [first, last] (adjacent) of contiguous x, keeping them as size 1.
Tensor reduce_range(ReduceOp op, const Tensor& x, int64_t first, int64_t last, double scale) {
  const Shape& s = x.shape();
  int64_t outer = 1, R = 1, inner = 1;
  for (int64_t i = 0; i < first; ++i) outer *= s[i];
  for (int64_t i = first; i <= last; ++i) R *= s[i];
  for (int64_t i = last + 1; i < x.dim(); ++i) inner *= s[i];
  Shape out_shape = s;
  for (int64_t i = first; i <= last; ++i) out_shape[i] = 1;
  Tensor y = Tensor::empty(out_shape, x.dtype(), x.device());
  if (y.numel() == 0) return y;
  if (R == 0)
    return y.fill_(op == ReduceOp::kSum || op == ReduceOp::kSumSquares ? 0.0 : std::nan(""));
  kernels::ReduceParams p;
  p.op = op;
  p.dtype = x.dtype();
  p.x = x.raw_data();
  p.y = y.raw_data();
  p.outer = outer;
  p.reduce = R;
  p.inner = inner;
  p.scale = scale;
  p.stream = current_stream(x.device());
  const Tensor ws = HYDRA_CUDA_WORKSPACE(x.device(), reduce_axis_workspace, p);
  p.workspace = ws.defined() ? ws.raw_data() : nullptr;
  std::optional<KernelProfileScope> detail;
  if (kernel_profile_detailed()) {
    const int64_t dims[3] = {outer, R, inner};
    detail.emplace(x.device(), "reduce op" + std::to_string(static_cast<int>(op)) + " " +
                                   std::string(dtype_name(p.dtype)) + " " + profile_dims(dims, 3));
  }
  HYDRA_LAUNCH(x.device(), reduce_axis, p);
  return y;
}

std::vector<int64_t> normalize_axes(const std::vector<int64_t>& axes, int64_t ndim, const char* op,
                                    const Shape& shape) {
  std::set<int64_t> out;
  if (axes.empty()) {
    for (int64_t i = 0; i < ndim; ++i) out.insert(i);
  }
  for (int64_t a : axes) {
    HYDRA_CHECK(a >= -ndim && a < ndim)
        << op << ": axis " << a << " out of range for shape " << shape_str(shape);
    out.insert(a < 0 ? a + ndim : a);
  }
  return {out.begin(), out.end()};
}

// Reduces the given (sorted) axes, merging runs of adjacent axes into one kernel call. The result
// keeps the reduced axes as size 1.
Tensor reduce_axes(ReduceOp op, const Tensor& x_in, const std::vector<int64_t>& axes,
                   double scale) {
  Tensor y = x_in.contiguous();
  for (int64_t i = static_cast<int64_t>(axes.size()) - 1; i >= 0;) {
    int64_t j = i;
    while (j > 0 && axes[j - 1] == axes[j] - 1) --j;
    const bool last_run = j == 0;
    y = reduce_range(op, y, axes[j], axes[i], last_run ? scale : 1.0);
    i = j - 1;
  }
  if (axes.empty() && scale != 1.0) y = affine(y, scale, 0.0);
  return y;
}

Shape drop_axes(const Shape& shape, const std::vector<int64_t>& axes) {
  Shape out;
  for (int64_t i = 0; i < static_cast<int64_t>(shape.size()); ++i)
    if (!std::binary_search(axes.begin(), axes.end(), i)) out.push_back(shape[i]);
  return out;
}

Tensor sum_impl(const Tensor& x, const std::vector<int64_t>& axes_in, bool keepdim, double scale,
                const char* name) {
  HYDRA_CHECK(is_floating(x.dtype()))
      << name << ": floating input expected, got " << dtype_name(x.dtype());
  const std::vector<int64_t> axes = normalize_axes(axes_in, x.dim(), name, x.shape());
  Tensor kept = reduce_axes(ReduceOp::kSum, x.detach(), axes, scale);
  Tensor out = keepdim ? kept : kept.view(drop_axes(x.shape(), axes));
  const Shape& in_shape = x.shape();
  const Shape& kept_shape = kept.shape();
  record_op(name, {x}, {out}, [in_shape, kept_shape, scale](const std::vector<Tensor>& g) {
    Tensor gk = g[0].reshape(kept_shape);
    if (scale != 1.0) gk = mul(gk, scale);
    // Broadcast into x's gradient summed so far when the engine offers it (the MoE router's chunk
    // means: one pass over the input's gradient instead of a materialised sum and an add).
    Tensor acc = gradient_sum_target(0, in_shape, gk.dtype(), gk.device());
    if (acc.defined()) return std::vector<Tensor>{acc.add_(gk)};
    return std::vector<Tensor>{gk.expand(in_shape)};
  });
  return out;
}

}  // namespace

Tensor sum(const Tensor& x, const std::vector<int64_t>& axes, bool keepdim) {
  return sum_impl(x, axes, keepdim, 1.0, "sum");
}

Tensor mean(const Tensor& x, const std::vector<int64_t>& axes_in, bool keepdim) {
  const std::vector<int64_t> axes = normalize_axes(axes_in, x.dim(), "mean", x.shape());
  int64_t count = 1;
  for (int64_t a : axes) count *= x.shape()[a];
  return sum_impl(x, axes, keepdim, count > 0 ? 1.0 / static_cast<double>(count) : 1.0, "mean");
}

Tensor sum_to(const Tensor& x, const Shape& shape) {
  if (x.shape() == shape) return x;
  const int64_t lead = x.dim() - static_cast<int64_t>(shape.size());
  HYDRA_CHECK(lead >= 0) << "sum_to: cannot reduce " << shape_str(x.shape()) << " to "
                         << shape_str(shape);
  std::vector<int64_t> axes;
  for (int64_t i = 0; i < x.dim(); ++i) {
    if (i < lead || (shape[i - lead] == 1 && x.shape()[i] != 1)) {
      axes.push_back(i);
    } else {
      HYDRA_CHECK(shape[i - lead] == x.shape()[i])
          << "sum_to: cannot reduce " << shape_str(x.shape()) << " to " << shape_str(shape);
    }
  }
  return sum(x, axes, true).reshape(shape);
}

Tensor amax(const Tensor& x, int64_t axis, bool keepdim) {
  const std::vector<int64_t> axes = normalize_axes({axis}, x.dim(), "amax", x.shape());
  Tensor kept = reduce_axes(ReduceOp::kMax, x.detach(), axes, 1.0);
  return keepdim ? kept : kept.view(drop_axes(x.shape(), axes));
}

Tensor sum_squares(const Tensor& x) {
  std::vector<int64_t> all(x.dim());
  for (int64_t i = 0; i < x.dim(); ++i) all[i] = i;
  return reduce_axes(ReduceOp::kSumSquares, x.detach(), all, 1.0).reshape({1});
}

}  // namespace hydra

namespace hydra {

namespace {

// The tensors grouped by (device, dtype) in the order of first appearance (a fixed summation
// order), contiguous.
std::vector<std::vector<Tensor>> square_groups(const std::vector<Tensor>& xs) {
  std::vector<std::vector<Tensor>> groups;
  for (const Tensor& x : xs) {
    if (!x.defined() || x.numel() == 0) continue;
    auto it = std::find_if(groups.begin(), groups.end(), [&](const std::vector<Tensor>& g) {
      return g.front().device() == x.device() && g.front().dtype() == x.dtype();
    });
    Tensor c = x.detach().contiguous();
    if (it == groups.end()) {
      groups.push_back({c});
    } else {
      it->push_back(c);
    }
  }
  return groups;
}

// One launch per kMax tensors of a group. Returns the sum of the launches' sums (waiting for each),
// or, with add_to, adds each into *add_to on the device and returns 0 without waiting.
double launch_squares(const std::vector<Tensor>& g, double* add_to) {
  const Device dev = g.front().device();
  double total = 0;
  for (std::size_t first = 0; first < g.size(); first += kernels::MultiSumSquaresParams::kMax) {
    kernels::MultiSumSquaresParams p;
    p.dtype = g.front().dtype();
    p.count = static_cast<int>(
        std::min<std::size_t>(kernels::MultiSumSquaresParams::kMax, g.size() - first));
    for (int i = 0; i < p.count; ++i) {
      p.x[i] = g[first + i].raw_data();
      p.n[i] = g[first + i].numel();
    }
    double out = 0;
    p.out = &out;
    p.add_to = add_to;
    p.stream = current_stream(dev);
    Tensor ws = HYDRA_CUDA_WORKSPACE(dev, multi_sum_squares_workspace, p);
    p.workspace = ws.defined() ? ws.raw_data() : nullptr;
    HYDRA_LAUNCH(dev, multi_sum_squares, p);
    total += out;
  }
  return total;
}

}  // namespace

double sum_squares_all(const std::vector<Tensor>& xs) {
  double total = 0;
  for (const auto& g : square_groups(xs)) total += launch_squares(g, nullptr);
  return total;
}

Tensor sum_squares_all_on(const std::vector<Tensor>& xs, Device device) {
  Tensor total = zeros({1}, DType::kF64, device);
  for (const auto& g : square_groups(xs)) {
    HYDRA_CHECK(g.front().device() == device)
        << "sum_squares_all_on: a tensor on " << g.front().device().str() << ", expected "
        << device.str();
    launch_squares(g, total.data<double>());
  }
  return total;
}

}  // namespace hydra
