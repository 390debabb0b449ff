// Views: new shape/strides/offset over the same storage. Each records its backward.
#include <algorithm>
#include <numeric>

#include "autograd/engine.h"
#include "autograd/node.h"
#include "autograd/ops.h"
#include "autograd/tensor.h"

namespace hydra {
namespace {

int64_t wrap_dim(int64_t d, int64_t ndim, const char* op, const Shape& shape) {
  HYDRA_CHECK(d >= -ndim && d < ndim)
      << op << ": dimension " << d << " out of range for shape " << shape_str(shape);
  return d < 0 ? d + ndim : d;
}

Tensor make_view(const Tensor& base, int64_t offset, Shape shape, Shape strides) {
  return Tensor::view_of(base.storage(), offset, std::move(shape), std::move(strides),
                         base.dtype());
}

// Marks the op just recorded for `out` as keeping its input's elements in order (Node::flat_view).
const Tensor& mark_flat_view(const Tensor& out) {
  if (out.defined() && out.grad_fn() != nullptr) out.grad_fn()->set_flat_view(true);
  return out;
}

Shape infer_shape(Shape shape, int64_t numel, const Shape& from) {
  int64_t known = 1, infer = -1;
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == -1) {
      HYDRA_CHECK(infer < 0) << "reshape: more than one -1 in " << shape_str(shape);
      infer = static_cast<int64_t>(i);
    } else {
      HYDRA_CHECK(shape[i] >= 0) << "reshape: negative size in " << shape_str(shape);
      known *= shape[i];
    }
  }
  if (infer >= 0) {
    HYDRA_CHECK(known > 0 && numel % known == 0)
        << "reshape: cannot reshape " << shape_str(from) << " to " << shape_str(shape);
    shape[infer] = numel / known;
  }
  HYDRA_CHECK(shape_numel(shape) == numel) << "reshape: cannot reshape " << shape_str(from) << " ("
                                           << numel << " elements) to " << shape_str(shape);
  return shape;
}

}  // namespace

Tensor Tensor::view(const Shape& shape_in) const {
  HYDRA_CHECK(is_contiguous()) << "view of a non-contiguous tensor of shape " << shape_str(shape())
                               << " (use reshape)";
  Shape s = infer_shape(shape_in, numel(), shape());
  Tensor out = make_view(*this, offset(), s, contiguous_strides(s));
  const Shape in_shape = shape();
  record_op("view", {*this}, {out}, [in_shape](const std::vector<Tensor>& g) {
    return std::vector<Tensor>{g[0].reshape(in_shape)};
  });
  return mark_flat_view(out);
}

namespace {

// The strides that give `shape` the elements of a tensor of shape `from` and strides `strides` in
// the same order, without moving them; false when none do (then reshape copies). Each group of
// dimensions merged or split must be contiguous within itself (each stride its inner neighbour's
// times that one's size); the groups' own strides may differ (a narrowed last dimension, say).
bool view_strides(const Shape& from, const Shape& strides, const Shape& shape, Shape* out) {
  out->assign(shape.size(), 1);
  if (shape_numel(from) == 0) {
    *out = contiguous_strides(shape);
    return true;
  }
  // Walk the old dimensions from the last, in chunks that are contiguous within themselves; each
  // chunk's element count is matched by a run of new dimensions.
  int64_t view_d = static_cast<int64_t>(shape.size()) - 1;
  int64_t chunk_base_stride = strides.empty() ? 1 : strides.back();
  int64_t tensor_numel = 1, view_numel = 1;
  for (int64_t d = static_cast<int64_t>(from.size()) - 1; d >= 0; --d) {
    tensor_numel *= from[d];
    const bool chunk_ends =
        d == 0 || (from[d - 1] != 1 && strides[d - 1] != tensor_numel * chunk_base_stride);
    if (!chunk_ends) continue;
    while (view_d >= 0 && (view_numel < tensor_numel || shape[view_d] == 1)) {
      (*out)[view_d] = view_numel * chunk_base_stride;
      view_numel *= shape[view_d];
      --view_d;
    }
    if (view_numel != tensor_numel) return false;
    if (d > 0) {
      chunk_base_stride = strides[d - 1];
      tensor_numel = 1;
      view_numel = 1;
    }
  }
  return view_d == -1;
}

}  // namespace

// A view whenever the elements' order allows one (a non-contiguous input's leading dimensions
// merged, say: a narrowed [B, L, R] of a wider last dimension as [B L, R]), else a copy. The
// result can be non-contiguous: ops that need contiguous memory ask for it.
Tensor Tensor::reshape(const Shape& shape_in) const {
  if (is_contiguous()) return view(shape_in);
  const Shape s = infer_shape(shape_in, numel(), shape());
  Shape st;
  if (!view_strides(shape(), strides(), s, &st)) return contiguous().view(s);
  Tensor out = make_view(*this, offset(), s, st);
  const Shape in_shape = shape();
  record_op("reshape", {*this}, {out}, [in_shape](const std::vector<Tensor>& g) {
    return std::vector<Tensor>{g[0].reshape(in_shape)};
  });
  return mark_flat_view(out);
}

Tensor Tensor::flatten(int64_t start, int64_t end) const {
  const int64_t n = dim();
  if (n == 0) return reshape({1});
  start = wrap_dim(start, n, "flatten", shape());
  end = wrap_dim(end, n, "flatten", shape());
  Shape s(shape().begin(), shape().begin() + start);
  int64_t merged = 1;
  for (int64_t i = start; i <= end; ++i) merged *= shape()[i];
  s.push_back(merged);
  s.insert(s.end(), shape().begin() + end + 1, shape().end());
  return reshape(s);
}

Tensor Tensor::transpose(int64_t d0, int64_t d1) const {
  std::vector<int64_t> perm(dim());
  std::iota(perm.begin(), perm.end(), 0);
  std::swap(perm[wrap_dim(d0, dim(), "transpose", shape())],
            perm[wrap_dim(d1, dim(), "transpose", shape())]);
  return permute(perm);
}

Tensor Tensor::permute(const std::vector<int64_t>& dims) const {
  const int64_t n = dim();
  HYDRA_CHECK(static_cast<int64_t>(dims.size()) == n)
      << "permute: " << dims.size() << " dims for shape " << shape_str(shape());
  Shape s(n), st(n);
  std::vector<int64_t> inverse(n, -1);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t d = wrap_dim(dims[i], n, "permute", shape());
    HYDRA_CHECK(inverse[d] < 0) << "permute: dimension " << d << " repeated";
    inverse[d] = i;
    s[i] = shape()[d];
    st[i] = strides()[d];
  }
  Tensor out = make_view(*this, offset(), s, st);
  record_op("permute", {*this}, {out}, [inverse](const std::vector<Tensor>& g) {
    return std::vector<Tensor>{g[0].permute(inverse)};
  });
  return out;
}

Tensor Tensor::slice(int64_t d, int64_t start, int64_t end, int64_t step) const {
  d = wrap_dim(d, dim(), "slice", shape());
  const int64_t n = shape()[d];
  HYDRA_CHECK(step >= 1) << "slice: step must be >= 1, got " << step;
  HYDRA_CHECK(start >= 0 && start <= end && end <= n)
      << "slice: [" << start << ", " << end << ") out of range for dimension " << d << " of shape "
      << shape_str(shape());
  Shape s = shape(), st = strides();
  s[d] = (end - start + step - 1) / step;
  st[d] *= step;
  Tensor out = make_view(*this, offset() + start * strides()[d], s, st);
  const Shape in_shape = shape();
  const DType dt = dtype();
  record_op("slice", {*this}, {out},
            [in_shape, dt, d, start, end, step](const std::vector<Tensor>& g) {
              // Into the input's gradient summed so far when the engine offers it (a slice of
              // the MoE's input for its router: the sum has the whole input's other parts).
              Tensor sum = gradient_sum_target(0, in_shape, dt, g[0].device());
              if (sum.defined()) {
                Tensor part = sum.slice(d, start, end, step);
                part.copy_(add(part, g[0]));
                return std::vector<Tensor>{sum};
              }
              Tensor full_grad = zeros(in_shape, dt, g[0].device());
              full_grad.slice(d, start, end, step).copy_(g[0]);
              return std::vector<Tensor>{full_grad};
            });
  return out;
}

Tensor Tensor::narrow(int64_t d, int64_t start, int64_t length) const {
  return slice(d, start, start + length);
}

Tensor Tensor::select(int64_t d, int64_t index) const {
  d = wrap_dim(d, dim(), "select", shape());
  HYDRA_CHECK(index >= -shape()[d] && index < shape()[d])
      << "select: index " << index << " out of range for dimension " << d << " of shape "
      << shape_str(shape());
  if (index < 0) index += shape()[d];
  return narrow(d, index, 1).squeeze(d);
}

Tensor Tensor::unsqueeze(int64_t d) const {
  d = wrap_dim(d, dim() + 1, "unsqueeze", shape());
  Shape s = shape(), st = strides();
  const int64_t new_stride = d < dim() ? strides()[d] * shape()[d] : 1;
  s.insert(s.begin() + d, 1);
  st.insert(st.begin() + d, new_stride);
  Tensor out = make_view(*this, offset(), s, st);
  record_op("unsqueeze", {*this}, {out},
            [d](const std::vector<Tensor>& g) { return std::vector<Tensor>{g[0].squeeze(d)}; });
  return mark_flat_view(out);
}

Tensor Tensor::squeeze(int64_t d) const {
  d = wrap_dim(d, dim(), "squeeze", shape());
  HYDRA_CHECK(shape()[d] == 1) << "squeeze: dimension " << d << " of shape " << shape_str(shape())
                               << " is not 1";
  Shape s = shape(), st = strides();
  s.erase(s.begin() + d);
  st.erase(st.begin() + d);
  Tensor out = make_view(*this, offset(), s, st);
  record_op("squeeze", {*this}, {out},
            [d](const std::vector<Tensor>& g) { return std::vector<Tensor>{g[0].unsqueeze(d)}; });
  return mark_flat_view(out);
}

Tensor Tensor::expand(const Shape& target) const {
  const int64_t n = dim(), m = static_cast<int64_t>(target.size());
  HYDRA_CHECK(m >= n) << "expand: cannot expand " << shape_str(shape()) << " to fewer dimensions "
                      << shape_str(target);
  Shape st(m, 0);
  for (int64_t i = 0; i < m; ++i) {
    const int64_t j = i - (m - n);
    if (j < 0) continue;
    if (shape()[j] == target[i]) {
      st[i] = strides()[j];
    } else {
      HYDRA_CHECK(shape()[j] == 1)
          << "expand: cannot expand " << shape_str(shape()) << " to " << shape_str(target);
    }
  }
  Tensor out = make_view(*this, offset(), target, st);
  const Shape in_shape = shape();
  record_op("expand", {*this}, {out}, [in_shape](const std::vector<Tensor>& g) {
    return std::vector<Tensor>{sum_to(g[0], in_shape)};
  });
  return out;
}

}  // namespace hydra
