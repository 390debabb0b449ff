#include <algorithm>
#include <functional>
#include <numeric>

#include "autograd/dispatch.h"
#include "autograd/engine.h"
#include "autograd/grad_mode.h"
#include "autograd/node.h"
#include "autograd/ops.h"
#include "kernels/index.h"
#include "kernels/moe_combine.h"
#include "kernels/moe_route.h"
#include "kernels/pkm.h"
#include "kernels/topk.h"

namespace hydra {
namespace {

void check_index(const char* op, const Tensor& index, const Tensor& data) {
  HYDRA_CHECK(is_integral(index.dtype()))
      << op << ": index must be i32 or i64, got " << dtype_name(index.dtype());
  HYDRA_CHECK(index.device() == data.device())
      << op << ": index on " << index.device().str() << ", data on " << data.device().str();
}

// table[index[i]] += src[i] into `table` (contiguous, modified).
void scatter_rows_into(const Tensor& table, const Tensor& index, const Tensor& src) {
  kernels::ScatterAddRowsParams p;
  p.dtype = table.dtype();
  p.index_dtype = index.dtype();
  p.src = src.raw_data();
  p.index = index.raw_data();
  p.table = table.raw_data();
  p.n = index.numel();
  p.num_rows = table.size(0);
  p.cols = table.numel() / std::max<int64_t>(table.size(0), 1);
  p.stream = current_stream(table.device());
  const Tensor ws = HYDRA_CUDA_WORKSPACE(table.device(), scatter_add_rows_workspace, p);
  p.workspace = ws.defined() ? ws.raw_data() : nullptr;
  if (p.n > 0 && p.cols > 0) HYDRA_LAUNCH(table.device(), scatter_add_rows, p);
}

// out [inverse.size(0), C] with out[r] = the sum of src[inverse[r, k]] (kernels/index.h).
// `into` (defined): the rows' sums are added into it (a gradient summed so far).
Tensor gather_sum_rows_raw(const Tensor& src, const Tensor& inverse, const Tensor& into = {}) {
  const int64_t cols = src.size(1);
  Tensor out =
      into.defined() ? into : Tensor::empty({inverse.size(0), cols}, src.dtype(), src.device());
  kernels::GatherSumRowsParams p;
  p.dtype = src.dtype();
  p.src = src.raw_data();
  p.inverse = inverse.data<int64_t>();
  p.out = out.raw_data();
  p.accumulate = into.defined();
  p.rows = inverse.size(0);
  p.K = inverse.size(1);
  p.cols = cols;
  p.num_src = src.size(0);
  p.stream = current_stream(src.device());
  if (p.rows > 0 && cols > 0) HYDRA_LAUNCH(src.device(), gather_sum_rows, p);
  return out;
}

void check_inverse(const char* op, const Tensor& inverse, const Tensor& index, int64_t rows,
                   const Tensor& data) {
  check_index(op, index, data);
  HYDRA_CHECK(inverse.dtype() == DType::kI64 && inverse.dim() == 2 && inverse.size(0) == rows &&
              inverse.device() == data.device())
      << op << ": inverse must be an i64 [" << rows << ", K] tensor on " << data.device().str()
      << ", got " << dtype_name(inverse.dtype()) << " " << shape_str(inverse.shape());
}

Tensor gather_rows_raw(const Tensor& table, const Tensor& index) {
  const int64_t cols = table.size(1);
  Tensor out = Tensor::empty({index.numel(), cols}, table.dtype(), table.device());
  kernels::GatherRowsParams p;
  p.dtype = table.dtype();
  p.index_dtype = index.dtype();
  p.table = table.raw_data();
  p.index = index.raw_data();
  p.out = out.raw_data();
  p.n = index.numel();
  p.num_rows = table.size(0);
  p.cols = cols;
  p.stream = current_stream(table.device());
  if (p.n > 0 && cols > 0) HYDRA_LAUNCH(table.device(), gather_rows, p);
  return out;
}

// x viewed as [outer, axis, inner] around `axis`.
struct AxisSplit {
  int64_t outer = 1, inner = 1;
};
AxisSplit split_at(const Shape& s, int64_t axis) {
  AxisSplit a;
  for (int64_t i = 0; i < axis; ++i) a.outer *= s[i];
  for (int64_t i = axis + 1; i < static_cast<int64_t>(s.size()); ++i) a.inner *= s[i];
  return a;
}

int64_t wrap_axis(int64_t axis, int64_t ndim, const char* op) {
  HYDRA_CHECK(axis >= -ndim && axis < ndim)
      << op << ": axis " << axis << " out of range for " << ndim << " dimensions";
  return axis < 0 ? axis + ndim : axis;
}

// Launches axis gather (scatter = false) or scatter-add (scatter = true).
void axis_index(bool scatter, const Tensor& src, const Tensor& index, const Tensor& dst,
                int64_t axis, int64_t axis_len) {
  const AxisSplit s = split_at(index.shape(), axis);
  kernels::AxisIndexParams p;
  p.dtype = src.dtype();
  p.index_dtype = index.dtype();
  p.src = src.raw_data();
  p.index = index.raw_data();
  p.dst = dst.raw_data();
  p.outer = s.outer;
  p.axis = axis_len;
  p.count = index.shape()[axis];
  p.inner = s.inner;
  p.stream = current_stream(dst.device());
  if (index.numel() == 0) return;
  if (scatter) {
    HYDRA_LAUNCH(dst.device(), axis_scatter_add, p);
  } else {
    HYDRA_LAUNCH(dst.device(), axis_gather, p);
  }
}

void check_axis_index_shape(const char* op, const Shape& data, const Shape& index, int64_t axis) {
  bool ok = data.size() == index.size();
  for (std::size_t i = 0; ok && i < data.size(); ++i)
    ok = static_cast<int64_t>(i) == axis || data[i] == index[i];
  HYDRA_CHECK(ok) << op << ": index shape " << shape_str(index) << " must equal " << shape_str(data)
                  << " except along axis " << axis;
}

}  // namespace

Tensor gather_rows(const Tensor& table_in, const Tensor& index_in) {
  check_index("gather_rows", index_in, table_in);
  HYDRA_CHECK(table_in.dim() == 2)
      << "gather_rows: table must be 2-D, got " << shape_str(table_in.shape());
  Tensor table = table_in.contiguous(), index = index_in.contiguous();
  Tensor out = gather_rows_raw(table, index);
  if (any_requires_grad({table_in})) {
    SavedTensor si(index);
    const Shape& tshape = table.shape();
    const DType dt = table.dtype();
    record_op("gather_rows", {table_in}, {out}, [si, tshape, dt](const std::vector<Tensor>& g) {
      // Scattered into the table's gradient summed so far when the engine offers it.
      Tensor gt = gradient_sum_target(0, tshape, dt, g[0].device());
      if (!gt.defined()) gt = zeros(tshape, dt, g[0].device());
      scatter_rows_into(gt, si.get(), g[0].contiguous());
      return std::vector<Tensor>{gt};
    });
  }
  return out;
}

Tensor gather_rows(const Tensor& table_in, const Tensor& index_in, const Tensor& inverse_in) {
  HYDRA_CHECK(table_in.dim() == 2)
      << "gather_rows: table must be 2-D, got " << shape_str(table_in.shape());
  check_inverse("gather_rows", inverse_in, index_in, table_in.size(0), table_in);
  Tensor table = table_in.contiguous(), index = index_in.contiguous();
  Tensor out = gather_rows_raw(table, index);
  if (any_requires_grad({table_in})) {
    SavedTensor si(inverse_in.contiguous());
    const Shape& tshape = table.shape();
    record_op("gather_rows", {table_in}, {out}, [si, tshape](const std::vector<Tensor>& g) {
      // Added into the table's gradient summed so far when the engine offers it (the MoE's
      // dispatch: its input's sum with the router's part, through a view).
      const Tensor into = gradient_sum_target(0, tshape, g[0].dtype(), g[0].device());
      return std::vector<Tensor>{gather_sum_rows_raw(g[0].contiguous(), si.get(), into)};
    });
  }
  return out;
}

Tensor gather_sum_rows(const Tensor& src_in, const Tensor& inverse_in, const Tensor& index_in) {
  HYDRA_CHECK(src_in.dim() == 2 && index_in.numel() == src_in.size(0))
      << "gather_sum_rows: src " << shape_str(src_in.shape()) << ", index "
      << shape_str(index_in.shape()) << " (expected [n, C] and [n])";
  check_inverse("gather_sum_rows", inverse_in, index_in,
                inverse_in.dim() == 2 ? inverse_in.size(0) : -1, src_in);
  Tensor out = gather_sum_rows_raw(src_in.contiguous(), inverse_in.contiguous());
  if (any_requires_grad({src_in})) {
    SavedTensor si(index_in.contiguous());
    record_op("gather_sum_rows", {src_in}, {out}, [si](const std::vector<Tensor>& g) {
      return std::vector<Tensor>{gather_rows_raw(g[0].contiguous(), si.get())};
    });
  }
  return out;
}

Tensor embedding(const Tensor& weight, const Tensor& indices) {
  HYDRA_CHECK(weight.dim() == 2) << "embedding: weight must be [num_embeddings, dim], got "
                                 << shape_str(weight.shape());
  Shape out_shape = indices.shape();
  out_shape.push_back(weight.size(1));
  return gather_rows(weight, indices.reshape({-1})).view(out_shape);
}

Tensor scatter_add_rows(const Tensor& table_in, const Tensor& index_in, const Tensor& src_in) {
  check_index("scatter_add_rows", index_in, table_in);
  HYDRA_CHECK(table_in.dim() == 2 && src_in.dim() == 2 && src_in.size(1) == table_in.size(1) &&
              index_in.numel() == src_in.size(0))
      << "scatter_add_rows: table " << shape_str(table_in.shape()) << ", index "
      << shape_str(index_in.shape()) << ", src " << shape_str(src_in.shape())
      << " (expected [R, C], [n], [n, C])";
  HYDRA_CHECK(table_in.dtype() == src_in.dtype())
      << "scatter_add_rows: table and src dtypes differ";
  Tensor index = index_in.contiguous();
  Tensor out = table_in.detach().clone();
  scatter_rows_into(out, index, src_in.contiguous());
  SavedTensor si(index);
  const bool need_src = src_in.requires_grad();
  record_op("scatter_add_rows", {table_in, src_in}, {out},
            [si, need_src](const std::vector<Tensor>& g) {
              Tensor gc = g[0].contiguous();
              return std::vector<Tensor>{g[0], need_src ? gather_rows_raw(gc, si.get()) : Tensor()};
            });
  return out;
}

Tensor gather(const Tensor& x_in, int64_t axis, const Tensor& index_in) {
  check_index("gather", index_in, x_in);
  axis = wrap_axis(axis, x_in.dim(), "gather");
  check_axis_index_shape("gather", x_in.shape(), index_in.shape(), axis);
  Tensor x = x_in.contiguous(), index = index_in.contiguous();
  Tensor out = Tensor::empty(index.shape(), x.dtype(), x.device());
  axis_index(false, x, index, out, axis, x.shape()[axis]);
  if (any_requires_grad({x_in})) {
    SavedTensor si(index);
    const Shape& xshape = x.shape();
    const DType dt = x.dtype();
    record_op("gather", {x_in}, {out}, [si, xshape, dt, axis](const std::vector<Tensor>& g) {
      Tensor gx = zeros(xshape, dt, g[0].device());
      axis_index(true, g[0].contiguous(), si.get(), gx, axis, xshape[axis]);
      return std::vector<Tensor>{gx};
    });
  }
  return out;
}

Tensor scatter_add(const Tensor& x_in, int64_t axis, const Tensor& index_in, const Tensor& src_in) {
  check_index("scatter_add", index_in, x_in);
  axis = wrap_axis(axis, x_in.dim(), "scatter_add");
  HYDRA_CHECK(index_in.shape() == src_in.shape())
      << "scatter_add: index " << shape_str(index_in.shape()) << " and src "
      << shape_str(src_in.shape()) << " differ";
  check_axis_index_shape("scatter_add", x_in.shape(), index_in.shape(), axis);
  HYDRA_CHECK(x_in.dtype() == src_in.dtype()) << "scatter_add: x and src dtypes differ";
  Tensor index = index_in.contiguous();
  Tensor out = x_in.detach().clone();
  axis_index(true, src_in.contiguous(), index, out, axis, x_in.shape()[axis]);
  SavedTensor si(index);
  const bool need_src = src_in.requires_grad();
  record_op("scatter_add", {x_in, src_in}, {out},
            [si, axis, need_src](const std::vector<Tensor>& g) {
              Tensor gsrc;
              if (need_src) {
                Tensor idx = si.get(), gc = g[0].contiguous();
                gsrc = Tensor::empty(idx.shape(), gc.dtype(), gc.device());
                axis_index(false, gc, idx, gsrc, axis, gc.shape()[axis]);
              }
              return std::vector<Tensor>{g[0], gsrc};
            });
  return out;
}

Tensor concat(const std::vector<Tensor>& tensors, int64_t axis) {
  HYDRA_CHECK(!tensors.empty()) << "concat: no tensors";
  const Tensor& first = tensors[0];
  axis = wrap_axis(axis, first.dim(), "concat");
  Shape out_shape = first.shape();
  out_shape[axis] = 0;
  std::vector<int64_t> sizes;
  for (const Tensor& t : tensors) {
    bool ok = t.dim() == first.dim() && t.dtype() == first.dtype() && t.device() == first.device();
    for (int64_t i = 0; ok && i < t.dim(); ++i) ok = i == axis || t.shape()[i] == first.shape()[i];
    HYDRA_CHECK(ok) << "concat: " << shape_str(t.shape()) << " " << dtype_name(t.dtype())
                    << " does not match " << shape_str(first.shape()) << " "
                    << dtype_name(first.dtype()) << " along axis " << axis;
    sizes.push_back(t.shape()[axis]);
    out_shape[axis] += t.shape()[axis];
  }
  Tensor out = Tensor::empty(out_shape, first.dtype(), first.device());
  int64_t offset = 0;
  for (const Tensor& t : tensors) {
    out.narrow(axis, offset, t.shape()[axis]).copy_(t.detach());
    offset += t.shape()[axis];
  }
  record_op("concat", tensors, {out}, [sizes, axis](const std::vector<Tensor>& g) {
    std::vector<Tensor> grads;
    int64_t off = 0;
    for (int64_t s : sizes) {
      grads.push_back(g[0].narrow(axis, off, s));
      off += s;
    }
    return grads;
  });
  return out;
}

std::vector<Tensor> split(const Tensor& x, const std::vector<int64_t>& sizes, int64_t axis) {
  axis = wrap_axis(axis, x.dim(), "split");
  const int64_t total = std::accumulate(sizes.begin(), sizes.end(), int64_t{0});
  HYDRA_CHECK(total == x.shape()[axis])
      << "split: sizes add up to " << total << " but axis " << axis << " of "
      << shape_str(x.shape()) << " has " << x.shape()[axis];
  std::vector<Tensor> outs;
  int64_t off = 0;
  const Tensor base = x.detach();
  for (int64_t s : sizes) {
    outs.push_back(base.narrow(axis, off, s));
    off += s;
  }
  const Shape& xshape = x.shape();
  const DType dt = x.dtype();
  record_op("split", {x}, outs, [sizes, axis, xshape, dt](const std::vector<Tensor>& g) {
    std::vector<Tensor> parts;
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      if (g[i].defined()) {
        parts.push_back(g[i]);
      } else {
        Shape s = xshape;
        s[axis] = sizes[i];
        parts.push_back(zeros(s, dt, g[0].defined() ? g[0].device() : Device::cpu()));
      }
    }
    // One defined gradient fixes the device for the zeros; find it.
    Device dev = Device::cpu();
    for (const Tensor& t : g)
      if (t.defined()) dev = t.device();
    for (Tensor& p : parts) p = p.to(dev);
    return std::vector<Tensor>{concat(parts, axis)};
  });
  return outs;
}

std::pair<Tensor, Tensor> topk(const Tensor& x_in, int64_t k) {
  HYDRA_CHECK(x_in.dim() >= 1 && is_floating(x_in.dtype()))
      << "topk: floating input with >= 1 dimension expected";
  const int64_t cols = x_in.size(-1);
  HYDRA_CHECK(k >= 0 && k <= cols) << "topk: k = " << k << " but the last axis of "
                                   << shape_str(x_in.shape()) << " has " << cols;
  Tensor x = x_in.contiguous();
  Shape out_shape = x.shape();
  out_shape.back() = k;
  Tensor values = Tensor::empty(out_shape, x.dtype(), x.device());
  Tensor indices = Tensor::empty(out_shape, DType::kI64, x.device());
  kernels::TopkParams p;
  p.dtype = x.dtype();
  p.x = x.raw_data();
  p.values = values.raw_data();
  p.indices = indices.raw_data();
  p.rows = cols ? x.numel() / cols : 0;
  p.cols = cols;
  p.k = k;
  p.stream = current_stream(x.device());
  if (p.rows > 0 && k > 0) HYDRA_LAUNCH(x.device(), topk, p);
  if (any_requires_grad({x_in})) {
    SavedTensor si(indices);
    const Shape& xshape = x.shape();
    const DType dt = x.dtype();
    record_op("topk", {x_in}, {values, Tensor()}, [si, xshape, dt](const std::vector<Tensor>& g) {
      Tensor gx = zeros(xshape, dt, g[0].device());
      Tensor idx = si.get();
      axis_index(true, g[0].contiguous(), idx, gx, idx.dim() - 1, xshape.back());
      return std::vector<Tensor>{gx};
    });
  }
  return {values, indices};
}

}  // namespace hydra

namespace hydra {

Tensor moe_combine(const Tensor& y_in, const Tensor& w_in, const Tensor& inverse_in,
                   const Tensor& widx_in, const Tensor& perm_in, int64_t experts,
                   int64_t chunk_len) {
  HYDRA_CHECK(y_in.dim() == 2 && w_in.dim() == 1 && inverse_in.dim() == 2)
      << "moe_combine: y [rows, C], w [pairs] and inverse [tokens, K] expected, got "
      << shape_str(y_in.shape()) << ", " << shape_str(w_in.shape()) << ", "
      << shape_str(inverse_in.shape());
  HYDRA_CHECK(experts >= 1 && chunk_len >= 1 && w_in.numel() % experts == 0 &&
              inverse_in.size(0) == w_in.numel() / experts * chunk_len)
      << "moe_combine: " << w_in.numel() << " pair weights, " << experts << " experts, chunks of "
      << chunk_len << " tokens and " << inverse_in.size(0) << " tokens do not agree";
  for (const Tensor* t : {&inverse_in, &widx_in, &perm_in})
    HYDRA_CHECK(t->dtype() == DType::kI64 && t->device() == y_in.device())
        << "moe_combine: inverse, widx and perm must be i64 on " << y_in.device().str();
  HYDRA_CHECK(widx_in.numel() >= y_in.size(0) && perm_in.numel() >= y_in.size(0))
      << "moe_combine: widx and perm need an entry for each of the " << y_in.size(0)
      << " rows of y";
  HYDRA_CHECK(w_in.dtype() == y_in.dtype() && w_in.device() == y_in.device())
      << "moe_combine: y and w differ in dtype or device";
  const Tensor y = y_in.contiguous(), w = w_in.contiguous(), inverse = inverse_in.contiguous(),
               widx = widx_in.contiguous(), perm = perm_in.contiguous();
  const int64_t tokens = inverse.size(0), cols = y.size(1);
  Tensor out = Tensor::empty({tokens, cols}, y.dtype(), y.device());
  kernels::MoeCombineParams p;
  p.dtype = y.dtype();
  p.tokens = tokens;
  p.K = inverse.size(1);
  p.rows = y.size(0);
  p.cols = cols;
  p.pairs = w.numel();
  p.experts = experts;
  p.chunk_len = chunk_len;
  p.y = y.raw_data();
  p.w = w.raw_data();
  p.inverse = inverse.data<int64_t>();
  p.widx = widx.data<int64_t>();
  p.out = out.raw_data();
  p.stream = current_stream(y.device());
  if (tokens > 0 && cols > 0) HYDRA_LAUNCH(y.device(), moe_combine_fwd, p);
  const bool need_y = y_in.requires_grad(), need_w = w_in.requires_grad();
  if (need_y || need_w) {
    SavedTensor sy(need_w ? y : Tensor()), sw(w), si(inverse), sx(widx), sp(perm);
    record_op("moe_combine", {y_in, w_in}, {out}, [=](const std::vector<Tensor>& g) {
      const Tensor go = g[0].contiguous(), yv = sy.get(), wv = sw.get();
      Tensor gy = need_y ? Tensor::empty({p.rows, p.cols}, go.dtype(), go.device()) : Tensor();
      Tensor gw = need_w ? Tensor::empty({p.pairs}, go.dtype(), go.device()) : Tensor();
      kernels::MoeCombineBwdParams q;
      q.fwd = p;
      q.fwd.y = yv.defined() ? yv.raw_data() : nullptr;
      q.fwd.w = wv.raw_data();
      q.fwd.inverse = si.get().data<int64_t>();
      q.fwd.widx = sx.get().data<int64_t>();
      q.fwd.out = nullptr;
      q.fwd.stream = current_stream(go.device());
      q.perm = sp.get().data<int64_t>();
      q.gout = go.raw_data();
      q.gy = gy.defined() ? gy.raw_data() : nullptr;
      q.gw = gw.defined() ? gw.raw_data() : nullptr;
      if (p.cols == 0) {
        if (gy.defined()) gy.zero_();
        if (gw.defined()) gw.zero_();
      } else {
        HYDRA_LAUNCH(go.device(), moe_combine_bwd, q);
      }
      return std::vector<Tensor>{gy, gw};
    });
  }
  return out;
}

void scatter_add_rows_(const Tensor& table, const Tensor& index, const Tensor& src) {
  check_index("scatter_add_rows_", index, table);
  HYDRA_CHECK(table.dim() == 2 && table.is_contiguous() && src.dim() == 2 &&
              src.size(1) == table.size(1) && index.numel() == src.size(0) &&
              table.dtype() == src.dtype())
      << "scatter_add_rows_: table " << shape_str(table.shape()) << " (contiguous), index "
      << shape_str(index.shape()) << ", src " << shape_str(src.shape()) << " of the table's dtype";
  NoGradGuard no_grad;
  scatter_rows_into(table, index.contiguous(), src.contiguous());
  table.storage()->bump_version();
}

void accumulate_sparse_grad(const Tensor& leaf, const Tensor& rows_in, const Tensor& values_in) {
  HYDRA_CHECK(leaf.is_leaf() && leaf.dim() == 2) << "sparse gradients go to 2-D leaves";
  HYDRA_CHECK(values_in.dim() == 2 && values_in.size(1) == leaf.size(1) &&
              rows_in.numel() == values_in.size(0))
      << "accumulate_sparse_grad: rows " << shape_str(rows_in.shape()) << ", values "
      << shape_str(values_in.shape()) << " for a leaf of shape " << shape_str(leaf.shape());
  NoGradGuard no_grad;
  Tensor rows = rows_in.reshape({-1}).to(DType::kI64), values = values_in.to(leaf.grad_dtype());
  if (const auto& prev = leaf.sparse_grad()) {
    rows = concat({prev->rows, rows}, 0);
    values = concat({prev->values, values}, 0);
  }
  // Coalesce: unique ascending rows, values of equal rows summed (in order: deterministic).
  const std::vector<int64_t> r = rows.to_vector<int64_t>();
  const Device dev = leaf.device();
  auto g = std::make_shared<SparseRows>();
  if (std::adjacent_find(r.begin(), r.end(), std::greater_equal<int64_t>()) == r.end()) {
    // Already coalesced (e.g. the embedding bag's per-row sums, first micro-batch): keep as they
    // are.
    g->rows = rows.clone();
    // Never the caller's tensors themselves: to() returns its input when the dtype already matches.
    g->values =
        values.dtype() == values_in.dtype() ? values.contiguous().clone() : values.contiguous();
    leaf.set_sparse_grad(std::move(g));
    run_grad_ready_hooks(leaf);
    return;
  }
  std::vector<int64_t> uniq = r;
  std::sort(uniq.begin(), uniq.end());
  uniq.erase(std::unique(uniq.begin(), uniq.end()), uniq.end());
  std::vector<int64_t> slot(r.size());
  for (std::size_t i = 0; i < r.size(); ++i)
    slot[i] = std::lower_bound(uniq.begin(), uniq.end(), r[i]) - uniq.begin();
  g->rows = tensor(uniq, {static_cast<int64_t>(uniq.size())}).to(dev);
  g->values = zeros({static_cast<int64_t>(uniq.size()), leaf.size(1)}, leaf.grad_dtype(), dev);
  scatter_rows_into(g->values, tensor(slot, {static_cast<int64_t>(slot.size())}).to(dev),
                    values.contiguous());
  leaf.set_sparse_grad(std::move(g));
  run_grad_ready_hooks(leaf);
}

Tensor densify_sparse_grad(const Tensor& leaf) {
  Tensor dense = zeros(leaf.shape(), leaf.dtype(), leaf.device());
  if (const auto& g = leaf.sparse_grad()) scatter_rows_into(dense, g->rows, g->values);
  return dense;
}

Tensor product_key_indices(const Tensor& a_in, const Tensor& b_in, const Tensor& pick_in,
                           int64_t n_keys, const Tensor& cells_in) {
  HYDRA_CHECK(a_in.dtype() == DType::kI64 && b_in.dtype() == DType::kI64 &&
              pick_in.dtype() == DType::kI64)
      << "product_key_indices: i64 operands expected";
  HYDRA_CHECK(a_in.dim() >= 1 && a_in.shape() == b_in.shape() && pick_in.dim() == a_in.dim() &&
              std::equal(a_in.shape().begin(), a_in.shape().end() - 1, pick_in.shape().begin()))
      << "product_key_indices: a " << shape_str(a_in.shape()) << ", b " << shape_str(b_in.shape())
      << ", pick " << shape_str(pick_in.shape()) << " (expected [..., k], [..., k], [..., count])";
  HYDRA_CHECK(a_in.device() == b_in.device() && a_in.device() == pick_in.device())
      << "product_key_indices: operands on different devices";
  HYDRA_CHECK(!cells_in.defined() || (cells_in.dtype() == DType::kI64 && cells_in.dim() == 1 &&
                                      cells_in.device() == a_in.device()))
      << "product_key_indices: cells must be an i64 [P] tensor on " << a_in.device().str();
  const Tensor a = a_in.contiguous(), b = b_in.contiguous(), pick = pick_in.contiguous();
  const Tensor cells = cells_in.defined() ? cells_in.contiguous() : Tensor();
  Tensor out = Tensor::empty(pick.shape(), DType::kI64, a.device());
  kernels::ProductKeyParams p;
  p.a = a.data<int64_t>();
  p.b = b.data<int64_t>();
  p.pick = pick.data<int64_t>();
  if (cells.defined()) {
    p.cells = cells.data<int64_t>();
    p.num_cells = cells.numel();
  }
  p.out = out.data<int64_t>();
  p.k = a.size(-1);
  p.count = pick.size(-1);
  p.rows = p.k ? a.numel() / p.k : 0;
  p.n_keys = n_keys;
  p.stream = current_stream(a.device());
  if (p.rows * p.count > 0) HYDRA_LAUNCH(a.device(), product_key_indices, p);
  return out;
}

Tensor embedding_bag(const Tensor& table_in, const Tensor& index_in, const Tensor& weights_in,
                     bool sparse_grad) {
  check_index("embedding_bag", index_in, table_in);
  HYDRA_CHECK(table_in.dim() == 2 && index_in.dim() == 2 && weights_in.shape() == index_in.shape())
      << "embedding_bag: table " << shape_str(table_in.shape()) << ", index "
      << shape_str(index_in.shape()) << ", weights " << shape_str(weights_in.shape())
      << " (expected [R, C], [n, m], [n, m])";
  HYDRA_CHECK(weights_in.dtype() == table_in.dtype() && weights_in.device() == table_in.device())
      << "embedding_bag: weights and table differ in dtype or device";
  const bool need_table = table_in.requires_grad(), need_w = weights_in.requires_grad();
  HYDRA_CHECK(!(sparse_grad && need_table) || table_in.is_leaf())
      << "embedding_bag: a sparse gradient needs the table to be a leaf (a parameter)";
  Tensor table = table_in.detach().contiguous(), index = index_in.contiguous(),
         weights = weights_in.detach().contiguous();
  const int64_t n = index.size(0), m = index.size(1), C = table.size(1);
  Tensor out = Tensor::empty({n, C}, table.dtype(), table.device());
  kernels::EmbeddingBagParams p;
  p.dtype = table.dtype();
  p.index_dtype = index.dtype();
  p.table = table.raw_data();
  p.index = index.raw_data();
  p.weights = weights.raw_data();
  p.out = out.raw_data();
  p.n = n;
  p.m = m;
  p.num_rows = table.size(0);
  p.cols = C;
  p.stream = current_stream(table.device());
  const Tensor fwd_ws = HYDRA_CUDA_WORKSPACE(table.device(), embedding_bag_fwd_workspace, p);
  p.workspace = fwd_ws.defined() ? fwd_ws.raw_data() : nullptr;
  if (n > 0) HYDRA_LAUNCH(table.device(), embedding_bag_fwd, p);
  p.workspace = nullptr;  // the backward's is its own
  const bool sparse_table = sparse_grad && need_table && GradMode::enabled();
  std::vector<SavedTensor> saved = {SavedTensor(table), SavedTensor(index), SavedTensor(weights)};
  const Tensor leaf = sparse_table ? table_in : Tensor();
  const Shape& tshape = table.shape();
  record_op(
      "embedding_bag", {sparse_grad ? Tensor() : table_in, weights_in}, {out},
      [=](const std::vector<Tensor>& g) {
        for (const SavedTensor& s : saved) (void)s.get();
        const Tensor gout = g[0].contiguous();
        const Device dev = gout.device();
        Tensor gw = need_w ? Tensor::empty({n, m}, p.dtype, dev) : Tensor();
        // The table's gradient summed per row on the device (never one row per lookup), and which
        // rows the lookups hit (the sparse gradient's rows).
        Tensor gtable = need_table ? Tensor::empty(tshape, p.dtype, dev) : Tensor();
        Tensor hits = sparse_table ? Tensor::empty({tshape[0]}, DType::kI32, dev) : Tensor();
        kernels::EmbeddingBagBwdParams q;
        q.fwd = p;
        q.fwd.stream = current_stream(dev);
        q.gout = gout.raw_data();
        q.gweights = gw.defined() ? gw.raw_data() : nullptr;
        q.gtable = gtable.defined() ? gtable.raw_data() : nullptr;
        q.hits = hits.defined() ? hits.raw_data() : nullptr;
        const Tensor ws = HYDRA_CUDA_WORKSPACE(dev, embedding_bag_bwd_workspace, q);
        q.workspace = ws.defined() ? ws.raw_data() : nullptr;
        if (gw.defined() || gtable.defined()) HYDRA_LAUNCH(dev, embedding_bag_bwd, q);
        if (sparse_table) {
          // The rows the lookups hit become the sparse gradient's rows: their count needs the
          // host. A leaf without a gradient yet gets it pending (read when first needed, after
          // the backward is queued); one that has a gradient adds this one at once.
          auto rows_of_hits = [](const Tensor& hit_t, Device d) {
            const std::vector<int32_t> hit = hit_t.to_vector<int32_t>();
            std::vector<int64_t> rows;
            for (std::size_t r = 0; r < hit.size(); ++r)
              if (hit[r]) rows.push_back(static_cast<int64_t>(r));
            return tensor(rows, {static_cast<int64_t>(rows.size())}).to(d);
          };
          if (!leaf.sparse_grad()) {
            auto sg = std::make_shared<SparseRows>();
            sg->pending = [gtable, hits, dev, rows_of_hits,
                           gd = leaf.grad_dtype()](SparseRows& out) {
              NoGradGuard ng;
              out.rows = rows_of_hits(hits, dev);
              out.values = gather_rows_raw(gtable, out.rows).to(gd).contiguous();
            };
            sg->dense = gtable;
            sg->hits = hits;
            leaf.set_sparse_grad(std::move(sg));
            run_grad_ready_hooks(leaf);
          } else {
            const Tensor rows_t = rows_of_hits(hits, dev);
            accumulate_sparse_grad(leaf, rows_t, gather_rows_raw(gtable, rows_t));
          }
          gtable = Tensor();
        }
        return std::vector<Tensor>{gtable, gw};
      },
      sparse_table);
  return out;
}

MoeDispatch moe_route(const Tensor& r_in, const Tensor& s_in, int64_t batch, int64_t chunk_len,
                      int64_t max_active, int64_t capacity, int64_t tile) {
  HYDRA_CHECK(r_in.dim() == 2 && r_in.shape() == s_in.shape() && is_floating(r_in.dtype()) &&
              s_in.dtype() == r_in.dtype() && s_in.device() == r_in.device())
      << "moe_route: r " << shape_str(r_in.shape()) << " and s " << shape_str(s_in.shape())
      << " must be floating [rows, experts] tensors of one dtype and device";
  const int64_t rows = r_in.size(0), E = r_in.size(1);
  HYDRA_CHECK(batch >= 1 && rows % batch == 0 && chunk_len >= 1 && max_active >= 0)
      << "moe_route: " << rows << " rows for batch " << batch << ", chunk_len " << chunk_len
      << ", max_active " << max_active;
  const Device dev = r_in.device();
  const Tensor r = r_in.detach().contiguous(), s = s_in.detach().contiguous();
  MoeDispatch out;
  out.mask = Tensor::empty({rows, E}, r.dtype(), dev);
  kernels::MoeRouteParams p;
  p.batch = batch;
  p.chunks = rows / batch;
  p.experts = E;
  p.chunk_len = chunk_len;
  p.max_active = max_active;
  p.tile = std::max<int64_t>(tile, 0);
  const int64_t slots = kernels::moe_route_slots(p);
  Tensor perm = Tensor::empty({slots}, DType::kI64, dev),
         widx = Tensor::empty({slots}, DType::kI64, dev);
  if (p.tile > 0) out.tiles = Tensor::empty({kernels::moe_route_tiles(p)}, DType::kI64, dev);
  out.inverse = Tensor::empty({rows * chunk_len, std::min(max_active, E)}, DType::kI64, dev);
  Tensor counts =
      Tensor::empty({2, E}, DType::kI64, dev);  // counts, then dropped: one copy to the host
  p.dtype = r.dtype();
  p.capacity = capacity;
  p.r = r.raw_data();
  p.s = s.raw_data();
  p.mask = out.mask.raw_data();
  p.counts = counts.data<int64_t>();
  p.dropped = counts.data<int64_t>() + E;
  p.perm = perm.data<int64_t>();
  p.widx = widx.data<int64_t>();
  p.inverse = out.inverse.data<int64_t>();
  p.tiles = out.tiles.defined() ? out.tiles.data<int64_t>() : nullptr;
  p.stream = current_stream(dev);
  const Tensor ws = HYDRA_CUDA_WORKSPACE(dev, moe_route_workspace, p);
  p.workspace = ws.defined() ? ws.raw_data() : nullptr;
  if (E > 0) HYDRA_LAUNCH(dev, moe_route, p);
  out.device_counts = counts;
  if (p.tile > 0) {  // nothing waits: the counts follow behind the queued work
    out.host_counts = std::make_shared<PendingHostCopy>(counts);
    out.perm = perm;
    out.widx = widx;
    return out;
  }
  const std::vector<int64_t> host = E > 0 ? counts.to_vector<int64_t>() : std::vector<int64_t>();
  out.counts.assign(host.begin(), host.begin() + E);
  out.dropped.assign(host.begin() + E, host.end());
  int64_t kept = 0;
  for (int64_t c : out.counts) kept += c;
  out.perm = perm.narrow(0, 0, kept * chunk_len);
  out.widx = widx.narrow(0, 0, kept * chunk_len);
  return out;
}

}  // namespace hydra
