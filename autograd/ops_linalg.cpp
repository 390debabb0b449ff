#include <algorithm>
#include <map>
#include <mutex>
#include <optional>
#include <string>

#include "autograd/dispatch.h"
#include "autograd/engine.h"
#include "autograd/node.h"
#include "autograd/ops.h"
#include "kernels/matmul.h"

namespace hydra {
namespace {

// A [batch, rows, cols] view as BLAS sees it: a stored row-major matrix, possibly transposed.
struct BlasOperand {
  Tensor t;
  int64_t ld = 0;
  bool trans = false;
  int64_t batch_stride = 0;
};

BlasOperand as_blas_operand(const Tensor& m) {
  const int64_t r = m.size(1), c = m.size(2), sr = m.stride(1), sc = m.stride(2);
  const int64_t bs = m.size(0) == 1 ? 0 : m.stride(0);
  if (sc == 1 || c == 1) {
    const int64_t ld = r == 1 ? std::max<int64_t>(c, 1) : sr;
    if (ld >= std::max<int64_t>(c, 1)) return {m, ld, false, bs};
  }
  if (sr == 1 || r == 1) {
    const int64_t ld = c == 1 ? std::max<int64_t>(r, 1) : sc;
    if (ld >= std::max<int64_t>(r, 1)) return {m, ld, true, bs};
  }
  Tensor mc = m.contiguous();
  return {mc, std::max<int64_t>(c, 1), false, m.size(0) == 1 ? 0 : r * c};
}

// The cuBLASLt workspace of a device: allocated once through the caching allocator, kept for the
// process.
void* gemm_workspace(Device device) {
  if (device.is_cpu()) return nullptr;
  static std::mutex mu;
  static std::map<int, Tensor> spaces;
  std::lock_guard<std::mutex> lock(mu);
  Tensor& t = spaces[device.index];
  if (!t.defined()) t = scratch(device, kernels::kGemmWorkspace);
  return t.raw_data();
}

// out[i] = alpha * op(a[i]) @ op(b[i]) + beta * out[i] (+ bias on every row) for [batch, *, *]
// operands (batch 1 broadcasts).
void gemm_into(const Tensor& out, const Tensor& a, bool ta, const Tensor& b, bool tb, double beta,
               const Tensor& bias = Tensor()) {
  const BlasOperand A = as_blas_operand(a), B = as_blas_operand(b);
  kernels::GemmParams p;
  p.dtype = out.dtype();
  p.trans_a = ta != A.trans;
  p.trans_b = tb != B.trans;
  p.m = out.size(1);
  p.n = out.size(2);
  p.k = ta ? a.size(1) : a.size(2);
  p.a = A.t.raw_data();
  p.lda = A.ld;
  p.b = B.t.raw_data();
  p.ldb = B.ld;
  p.c = out.raw_data();
  p.ldc = std::max<int64_t>(p.n, 1);
  p.batch = out.size(0);
  p.stride_a = A.batch_stride;
  p.stride_b = B.batch_stride;
  p.stride_c = p.m * p.n;
  p.beta = beta;
  p.bias = bias.defined() ? bias.raw_data() : nullptr;
  p.workspace = gemm_workspace(out.device());
  p.stream = current_stream(out.device());
  if (p.m == 0 || p.n == 0 || p.batch == 0) return;
  std::optional<KernelProfileScope> shape_row;
  if (kernel_profile_detailed())
    shape_row.emplace(out.device(), "gemm " + std::to_string(p.m) + "x" + std::to_string(p.n) +
                                        "x" + std::to_string(p.k) + " " +
                                        std::string(dtype_name(p.dtype)) + " " +
                                        (p.trans_a ? "T" : "N") + (p.trans_b ? "T" : "N") + " b" +
                                        std::to_string(p.batch) + (p.bias ? " +bias" : ""));
  HYDRA_LAUNCH(out.device(), gemm, p);
}

// op(a) @ op(b) for [batch, *, *] operands, as a new contiguous tensor.
Tensor mm(const Tensor& a, bool ta, const Tensor& b, bool tb) {
  const int64_t batch = std::max(a.size(0), b.size(0));
  const int64_t m = ta ? a.size(2) : a.size(1), n = tb ? b.size(1) : b.size(2);
  Tensor out = Tensor::empty({batch, m, n}, a.dtype(), a.device());
  if ((ta ? a.size(1) : a.size(2)) == 0) return out.zero_();
  gemm_into(out, a, ta, b, tb, 0.0);
  return out;
}

// A weight's gradient op(a) @ op(b) ([1, *, *] operands -> `shape`), computed straight into the
// weight's gradient destination when it can claim one (a communication bucket: no copy afterwards),
// else into a new tensor.
Tensor weight_grad(const Tensor& w, const Tensor& a, bool ta, const Tensor& b, bool tb,
                   const Shape& shape) {
  Tensor dest = w.claim_grad_destination(a.dtype());
  if (dest.defined() && dest.is_contiguous() && dest.device() == a.device()) {
    const int64_t m = ta ? a.size(2) : a.size(1), n = tb ? b.size(1) : b.size(2);
    gemm_into(dest.view({1, m, n}), a, ta, b, tb, 0.0);
    return dest;
  }
  return mm(a, ta, b, tb).view(shape);
}

void check_operands(const char* op, const Tensor& a, const Tensor& b) {
  HYDRA_CHECK(a.device() == b.device())
      << op << ": operands on " << a.device().str() << " and " << b.device().str();
  HYDRA_CHECK(a.dtype() == b.dtype()) << op << ": operand dtypes " << dtype_name(a.dtype())
                                      << " and " << dtype_name(b.dtype()) << " differ";
  HYDRA_CHECK(is_floating(a.dtype())) << op << ": floating operands expected";
}

}  // namespace

Tensor matmul(const Tensor& a, const Tensor& b) {
  check_operands("matmul", a, b);
  HYDRA_CHECK(a.dim() >= 2 && b.dim() >= 2)
      << "matmul: operands need >= 2 dimensions, got " << shape_str(a.shape()) << " and "
      << shape_str(b.shape());
  const int64_t K = a.size(-1);
  HYDRA_CHECK(b.size(-2) == K) << "matmul: inner dimensions differ: " << shape_str(a.shape())
                               << " @ " << shape_str(b.shape());
  const int64_t M = a.size(-2), N = b.size(-1);
  Shape out_shape(a.shape().begin(), a.shape().end() - 1);
  out_shape.push_back(N);
  if (b.dim() == 2) {
    // Fold a's batch into its rows: one GEMM.
    Tensor a3 = (a.dim() == 2 ? a.unsqueeze(0) : a.reshape({1, -1, K})).detach();
    Tensor b3 = b.unsqueeze(0).detach();
    Tensor out = mm(a3, false, b3, false).view(out_shape);
    const bool need_a = a.requires_grad(), need_b = b.requires_grad();
    SavedTensor sa(need_b ? a3 : Tensor()), sb(need_a ? b3 : Tensor());
    const Shape& a_shape = a.shape();
    const Shape& b_shape = b.shape();
    const Tensor b_leaf =
        need_b && b.is_leaf() ? b : Tensor();  // a weight: its gradient may go to a bucket
    record_op("matmul", {a, b}, {out}, [=](const std::vector<Tensor>& g) {
      Tensor g3 = g[0].reshape({1, -1, N});
      Tensor ga = need_a ? mm(g3, false, sb.get(), true).view(a_shape) : Tensor();
      Tensor gb = need_b ? weight_grad(b_leaf, sa.get(), true, g3, false, b_shape) : Tensor();
      return std::vector<Tensor>{ga, gb};
    });
    return out;
  }
  HYDRA_CHECK(a.dim() == b.dim() &&
              std::equal(a.shape().begin(), a.shape().end() - 2, b.shape().begin()))
      << "matmul: batch dimensions differ: " << shape_str(a.shape()) << " @ "
      << shape_str(b.shape());
  Tensor a3 = a.reshape({-1, M, K}).detach();
  Tensor b3 = b.reshape({-1, K, N}).detach();
  Tensor out = mm(a3, false, b3, false).view(out_shape);
  const bool need_a = a.requires_grad(), need_b = b.requires_grad();
  SavedTensor sa(need_b ? a3 : Tensor()), sb(need_a ? b3 : Tensor());
  const Shape& a_shape = a.shape();
  const Shape& b_shape = b.shape();
  record_op("bmm", {a, b}, {out}, [=](const std::vector<Tensor>& g) {
    Tensor g3 = g[0].reshape({-1, M, N});
    Tensor ga = need_a ? mm(g3, false, sb.get(), true).view(a_shape) : Tensor();
    Tensor gb = need_b ? mm(sa.get(), true, g3, false).view(b_shape) : Tensor();
    return std::vector<Tensor>{ga, gb};
  });
  return out;
}

Tensor linear(const Tensor& x, const Tensor& w, const Tensor& bias) {
  check_operands("linear", x, w);
  HYDRA_CHECK(w.dim() == 2 && x.dim() >= 1 && x.size(-1) == w.size(1))
      << "linear: input " << shape_str(x.shape()) << " does not match weight "
      << shape_str(w.shape()) << " (expected [..., in] and [out, in])";
  const int64_t in = w.size(1), out_features = w.size(0);
  if (bias.defined())
    HYDRA_CHECK(bias.dim() == 1 && bias.size(0) == out_features && bias.dtype() == w.dtype())
        << "linear: bias " << shape_str(bias.shape()) << " for weight " << shape_str(w.shape());
  Tensor x3 = (x.dim() == 2 ? x.unsqueeze(0) : x.reshape({1, -1, in})).detach();
  Tensor w3 = w.detach().unsqueeze(0);
  const int64_t rows = x3.size(1);
  Tensor out = Tensor::empty({1, rows, out_features}, x.dtype(), x.device());
  const Tensor b = bias.defined() ? bias.detach().contiguous() : Tensor();
  if (in == 0) {
    if (b.defined()) {
      out.copy_(b.expand(out.shape()));
    } else {
      out.zero_();
    }
  } else {
    gemm_into(out, x3, false, w3, true, 0.0, b);  // bias fused into the GEMM's epilogue
  }
  Shape out_shape(x.shape().begin(), x.shape().end() - 1);
  out_shape.push_back(out_features);
  out = out.view(out_shape);
  const bool need_x = x.requires_grad(), need_w = w.requires_grad(), has_bias = bias.defined();
  SavedTensor sx(need_w ? x3 : Tensor()), sw(need_x ? w3 : Tensor());
  const Shape& x_shape = x.shape();
  const Tensor w_leaf =
      need_w && w.is_leaf() ? w : Tensor();  // a weight: its gradient may go to a bucket
  record_op("linear", {x, w, bias}, {out}, [=](const std::vector<Tensor>& g) {
    Tensor g3 = g[0].reshape({1, -1, out_features});
    Tensor gx;
    if (need_x) {  // added into x's gradient summed so far when the engine offers it (beta = 1)
      gx = out_features > 0 ? gradient_sum_target(0, x_shape, g3.dtype(), g3.device()) : Tensor();
      if (gx.defined()) {
        gemm_into(gx.view({1, rows, in}), g3, false, sw.get(), false, 1.0);
      } else {
        gx = mm(g3, false, sw.get(), false).view(x_shape);
      }
    }
    Tensor gw =
        need_w ? weight_grad(w_leaf, g3, true, sx.get(), false, {out_features, in}) : Tensor();
    Tensor gb = has_bias ? sum(g3, {0, 1}) : Tensor();
    return std::vector<Tensor>{gx, gw, gb};
  });
  return out;
}

}  // namespace hydra

namespace hydra {

namespace {

// Above this many FLOPs per problem on average, one cuBLASLt GEMM per problem beats cuBLAS's
// grouped GEMM (hydra-bench-gpu on an H100: 8 problems of 4096 x 2048 x 512, 8.6 GFLOP each, take
// 0.27 ms grouped and 0.22 ms as 8 GEMMs, while 8 of 4096 x 384 x 192, 0.6 GFLOP each, take 0.065
// ms grouped and 0.14 ms as 8 GEMMs).
constexpr double kGroupedGemmMaxFlops = 2e9;

// Runs the problems as one grouped GEMM, or as one GEMM each when they are large or `one_each` (on
// the CPU: one after another). Weight gradients (a small output summed over thousands of rows) ask
// for one each in tiled_linear: cuBLASLt splits such a product over the SMs (split-K), the grouped
// GEMM does not (toy-parallel at 8K on the H200: the tiled experts' backward 7.1 -> 3.5 ms a step).
// grouped_linear keeps the grouped launch: on its benchmark row (8 equal groups of 4,096 rows) one
// GEMM each was slower (forward + backward 0.116 -> 0.143 ms).
void grouped_gemm_run(Device device, DType dtype, bool ta, bool tb,
                      const std::vector<kernels::GemmProblem>& problems, bool one_each = false) {
  if (problems.empty()) return;
  kernels::GroupedGemmParams p;
  p.dtype = dtype;
  p.trans_a = ta;
  p.trans_b = tb;
  p.problems = problems.data();
  p.count = static_cast<int64_t>(problems.size());
  double flops = 0;
  for (const kernels::GemmProblem& q : problems)
    flops += 2.0 * double(q.m) * double(q.n) * double(q.k);
  if (device.is_cuda() && (one_each || flops / double(problems.size()) > kGroupedGemmMaxFlops)) {
    for (const kernels::GemmProblem& q : problems) {
      kernels::GemmParams g = kernels::gemm_of(p, q);
      g.workspace = gemm_workspace(device);
      g.stream = current_stream(device);
      HYDRA_LAUNCH(device, gemm, g);
    }
    return;
  }
  const Tensor ws = HYDRA_CUDA_WORKSPACE(device, grouped_gemm_workspace, p);
  p.workspace = ws.defined() ? ws.raw_data() : nullptr;
  p.stream = current_stream(device);
  HYDRA_LAUNCH(device, grouped_gemm, p);
}

// The GEMM problem of `rows` rows of the row-major operands a ([rows, *]), b and c ([rows, *]).
kernels::GemmProblem problem(const Tensor& a, const Tensor& b, const Tensor& c, int64_t k,
                             double beta = 0) {
  kernels::GemmProblem q;
  q.m = c.size(0);
  q.n = c.size(1);
  q.k = k;
  q.a = a.raw_data();
  q.lda = a.stride(0);
  q.b = b.raw_data();
  q.ldb = b.stride(0);
  q.c = c.raw_data();
  q.ldc = c.stride(0);
  q.beta = beta;
  return q;
}

}  // namespace

// Every group's GEMM runs in one grouped launch (forward, input gradient), and the weight gradient
// in one launch per round of G groups (groups of the same expert accumulate into the same gw[g], in
// group order, so the sum is deterministic).
Tensor grouped_linear(const Tensor& x, const Tensor& w, const std::vector<int64_t>& group_sizes) {
  check_operands("grouped_linear", x, w);
  const auto S = static_cast<int64_t>(group_sizes.size());
  HYDRA_CHECK(x.dim() == 2 && w.dim() == 3 && x.size(1) == w.size(2) && S > 0 && S % w.size(0) == 0)
      << "grouped_linear: x " << shape_str(x.shape()) << ", w " << shape_str(w.shape()) << ", " << S
      << " row groups (expected [n, in], [G, out, in], a multiple of G groups)";
  int64_t total = 0;
  for (int64_t s : group_sizes) {
    HYDRA_CHECK(s >= 0) << "grouped_linear: negative group size";
    total += s;
  }
  HYDRA_CHECK(total == x.size(0)) << "grouped_linear: group sizes add up to " << total << ", x has "
                                  << x.size(0) << " rows";
  const int64_t in = w.size(2), out_f = w.size(1), G = w.size(0);
  const Device dev = x.device();
  const DType dt = x.dtype();
  Tensor xc = x.detach().contiguous(), wc = w.detach().contiguous();
  Tensor y = Tensor::empty({total, out_f}, dt, dev);
  std::vector<int64_t> starts(S + 1, 0);
  for (int64_t s = 0; s < S; ++s) starts[s + 1] = starts[s] + group_sizes[s];
  if (in == 0) {
    y.zero_();
  } else {
    std::vector<kernels::GemmProblem> fwd;
    for (int64_t s = 0; s < S; ++s)
      if (group_sizes[s] > 0)
        fwd.push_back(problem(xc.narrow(0, starts[s], group_sizes[s]), wc.select(0, s % G),
                              y.narrow(0, starts[s], group_sizes[s]), in));
    grouped_gemm_run(dev, dt, false, true, fwd);
  }
  const bool need_x = x.requires_grad(), need_w = w.requires_grad();
  SavedTensor sx(need_w ? xc : Tensor()), sw(need_x ? wc : Tensor());
  record_op("grouped_linear", {x, w}, {y}, [=](const std::vector<Tensor>& grads) {
    const Tensor gy = grads[0].contiguous();
    Tensor gx = need_x ? Tensor::empty({total, in}, gy.dtype(), gy.device()) : Tensor();
    Tensor gw = need_w ? zeros({G, out_f, in}, gy.dtype(), gy.device()) : Tensor();
    const Tensor xs = sx.get(), ws = sw.get();
    if (need_x) {
      if (out_f == 0) gx.zero_();
      std::vector<kernels::GemmProblem> dx;
      for (int64_t s = 0; s < S && out_f > 0; ++s)
        if (group_sizes[s] > 0)
          dx.push_back(problem(gy.narrow(0, starts[s], group_sizes[s]), ws.select(0, s % G),
                               gx.narrow(0, starts[s], group_sizes[s]), out_f));
      grouped_gemm_run(gy.device(), gy.dtype(), false, false, dx);
    }
    for (int64_t round = 0; need_w && round < S / G; ++round) {
      std::vector<kernels::GemmProblem> dw;  // gw[g] += gy_s^T x_s
      for (int64_t s = round * G; s < (round + 1) * G; ++s)
        if (group_sizes[s] > 0)
          dw.push_back(problem(gy.narrow(0, starts[s], group_sizes[s]),
                               xs.narrow(0, starts[s], group_sizes[s]), gw.select(0, s % G),
                               group_sizes[s], round > 0 ? 1.0 : 0.0));
      grouped_gemm_run(gy.device(), gy.dtype(), true, false, dw);
    }
    return std::vector<Tensor>{gx, gw};
  });
  return y;
}

namespace {

// C = A op(W[tiles[t]]) for every tile (kernels/matmul.h: tile_gemm).
void tile_gemm_run(const Tensor& a, const Tensor& w, bool trans_w, const TiledGroups& g,
                   const Tensor& c, double beta = 0) {
  kernels::TileGemmParams p;
  p.dtype = a.dtype();
  p.trans_w = trans_w;
  p.num_tiles = g.tiles.numel();
  p.tile = g.tile;
  p.a = a.raw_data();
  p.lda = a.stride(0);
  p.w = w.raw_data();
  p.groups = w.size(0);
  p.w_rows = w.size(1);
  p.w_cols = w.size(2);
  p.tiles = g.tiles.data<int64_t>();
  p.c = c.raw_data();
  p.ldc = c.stride(0);
  p.beta = beta;
  p.stream = current_stream(a.device());
  const Tensor ws = HYDRA_CUDA_WORKSPACE(a.device(), tile_gemm_workspace, p);
  p.workspace = ws.defined() ? ws.raw_data() : nullptr;
  if (p.num_tiles > 0 && c.size(1) > 0) HYDRA_LAUNCH(a.device(), tile_gemm, p);
}

}  // namespace

Tensor tiled_linear(const Tensor& x, const Tensor& w, const TiledGroups& groups) {
  check_operands("tiled_linear", x, w);
  HYDRA_CHECK(groups.tile >= 1 && groups.tiles.defined() && groups.tiles.dtype() == DType::kI64 &&
              groups.tiles.dim() == 1 && groups.tiles.device() == x.device())
      << "tiled_linear: tiles must be an i64 vector on " << x.device().str() << " and tile >= 1";
  HYDRA_CHECK(x.dim() == 2 && w.dim() == 3 && x.size(1) == w.size(2) &&
              x.size(0) == groups.tiles.numel() * groups.tile)
      << "tiled_linear: x " << shape_str(x.shape()) << ", w " << shape_str(w.shape()) << ", "
      << groups.tiles.numel() << " tiles of " << groups.tile
      << " rows (expected [tiles * tile, in] and [G, out, in])";
  const int64_t in = w.size(2), out_f = w.size(1), G = w.size(0), rows = x.size(0);
  const Tensor xc = x.detach().contiguous(), wc = w.detach().contiguous();
  Tensor y = Tensor::empty({rows, out_f}, x.dtype(), x.device());
  if (in == 0)
    y.zero_();
  else
    tile_gemm_run(xc, wc, true, groups, y);
  const bool need_x = x.requires_grad(), need_w = w.requires_grad();
  SavedTensor sx(need_w ? xc : Tensor()), sw(need_x ? wc : Tensor());
  record_op("tiled_linear", {x, w}, {y}, [=](const std::vector<Tensor>& grads) {
    const Tensor gy = grads[0].contiguous();
    Tensor gx, gw;
    if (need_x) {  // added into x's gradient summed so far when the engine offers it (beta = 1)
      gx = out_f > 0 ? gradient_sum_target(0, {rows, in}, gy.dtype(), gy.device()) : Tensor();
      if (gx.defined()) {
        tile_gemm_run(gy, sw.get(), false, groups, gx, 1.0);
      } else {
        gx = Tensor::empty({rows, in}, gy.dtype(), gy.device());
        if (out_f == 0)
          gx.zero_();
        else
          tile_gemm_run(gy, sw.get(), false, groups, gx);
      }
    }
    if (need_w) {  // gw[g] = gy_g^T x_g over the group's rows (padding excluded), from host sizes
      const std::vector<int64_t> sizes = groups.sizes();
      HYDRA_CHECK(static_cast<int64_t>(sizes.size()) == G)
          << "tiled_linear: " << sizes.size() << " group sizes for " << G << " groups";
      const Tensor xs = sx.get();
      std::vector<kernels::GemmProblem> dw;
      int64_t start = 0, total = 0;
      gw = zeros({G, out_f, in}, gy.dtype(), gy.device());
      for (int64_t g = 0; g < G; ++g) {
        if (sizes[g] > 0)
          dw.push_back(problem(gy.narrow(0, start, sizes[g]), xs.narrow(0, start, sizes[g]),
                               gw.select(0, g), sizes[g]));
        start += (sizes[g] + groups.tile - 1) / groups.tile * groups.tile;
        total += sizes[g];
      }
      HYDRA_CHECK(start <= rows) << "tiled_linear: groups of " << start << " rows in " << rows;
      if (total == 0) {
        gw = Tensor();  // no row reached any group: no gradient, as when the experts do not run
      } else {
        grouped_gemm_run(gy.device(), gy.dtype(), true, false, dw, /*one_each=*/true);
      }
    }
    return std::vector<Tensor>{gx, gw};
  });
  return y;
}

}  // namespace hydra
