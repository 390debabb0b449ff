// Every CUDA op against the CPU reference on random data (never zeros) at several shapes, odd ones
// included, in f32 and bf16, forward and backward. Fresh CUDA memory is NaN-poisoned, so an output
// element a kernel forgets to write fails. Relative error ||gpu - cpu|| / ||cpu||: f32 < 1e-5,
// bf16 < 1e-2 (the CPU runs in f32 on the same bf16-rounded inputs).
#include <gtest/gtest.h>

#include <cmath>
#include <functional>

#include "autograd/cuda_context.h"
#include "autograd/ops.h"
#include "autograd/optim_ops.h"
#include "base/determinism.h"
#include "tests/test_util.h"

namespace hydra {
namespace {

#define HYDRA_REQUIRE_GPU() \
  if (!cuda_available())    \
  GTEST_SKIP() << "no CUDA device (or a build without HYDRA_CUDA): GPU test skipped"

using OpFn = std::function<std::vector<Tensor>(const std::vector<Tensor>&)>;

double tolerance(DType t) { return t == DType::kBF16 ? 1e-2 : 1e-5; }

bool has_nan(const Tensor& t) {
  for (double v : t.to_vector<double>())
    if (std::isnan(v)) return true;
  return false;
}

// inputs: f32 (or integer) CPU tensors; `grad` marks the floating inputs to differentiate.
// `tol_scale` widens the tolerance for ops whose rounding grows with a length (said at the call).
void check_op(const std::string& name, const OpFn& fn, const std::vector<Tensor>& inputs,
              const std::vector<bool>& grad, DType dtype, double tol_scale = 1.0) {
  cuda_set_poison_allocations(true);
  std::vector<Tensor> cpu_in, gpu_in;
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    const Tensor& t = inputs[i];
    if (!is_floating(t.dtype())) {
      cpu_in.push_back(t);
      gpu_in.push_back(t.to(Device::cuda(0)));
      continue;
    }
    Tensor c = t.to(dtype).to(DType::kF32).contiguous();  // the values the GPU sees, in f32
    Tensor g = t.to(dtype).to(Device::cuda(0));
    if (grad[i]) {
      c = c.detach().clone();
      c.set_requires_grad(true);
      g = g.detach().clone();
      g.set_requires_grad(true);
    }
    cpu_in.push_back(c);
    gpu_in.push_back(g);
  }
  const std::vector<Tensor> cpu_out = fn(cpu_in), gpu_out = fn(gpu_in);
  ASSERT_EQ(cpu_out.size(), gpu_out.size());
  Generator gen(99);
  Tensor cpu_loss, gpu_loss;
  for (std::size_t o = 0; o < cpu_out.size(); ++o) {
    ASSERT_TRUE(gpu_out[o].device().is_cuda()) << name;
    const Tensor got = gpu_out[o].detach().to(DType::kF32).cpu();
    EXPECT_FALSE(has_nan(got)) << name << " output " << o << ": unwritten (NaN) elements";
    const double err = testing::rel_error(got, cpu_out[o].detach().to(DType::kF32));
    EXPECT_LT(err, tol_scale * tolerance(dtype))
        << name << " output " << o << " " << dtype_name(dtype) << " shape "
        << shape_str(cpu_out[o].shape());
    if (!cpu_out[o].requires_grad()) continue;
    const Tensor w = randn(cpu_out[o].shape(), gen, 0, 1);
    const Tensor cl = sum(mul(cpu_out[o].to(DType::kF32), w));
    const Tensor gl = sum(mul(gpu_out[o].to(DType::kF32), w.to(Device::cuda(0))));
    cpu_loss = cpu_loss.defined() ? add(cpu_loss, cl) : cl;
    gpu_loss = gpu_loss.defined() ? add(gpu_loss, gl) : gl;
  }
  if (cpu_loss.defined()) {
    cpu_loss.backward();
    gpu_loss.backward();
    for (std::size_t i = 0; i < inputs.size(); ++i) {
      if (!grad[i]) continue;
      ASSERT_TRUE(gpu_in[i].grad().defined()) << name << " input " << i << ": no gradient";
      const Tensor got = gpu_in[i].grad().to(DType::kF32).cpu();
      EXPECT_FALSE(has_nan(got)) << name << " gradient " << i << ": NaN";
      EXPECT_LT(testing::rel_error(got, cpu_in[i].grad()), tol_scale * tolerance(dtype))
          << name << " gradient of input " << i << " " << dtype_name(dtype);
    }
  }
  cuda_set_poison_allocations(false);
}

Tensor rnd(const Shape& s, uint64_t seed, double scale = 1.0) {
  return testing::randn32(s, seed, scale);
}
Tensor positive(const Shape& s, uint64_t seed) {
  return add(mul(exp(rnd(s, seed, 0.5)), 0.5), 0.5);
}

const DType kTypes[] = {DType::kF32, DType::kBF16};

TEST(CudaOps, UnaryMatchCpu) {
  HYDRA_REQUIRE_GPU();
  struct U {
    const char* name;
    std::function<Tensor(const Tensor&)> f;
    bool positive;
  };
  const std::vector<U> ops = {
      {"exp", [](const Tensor& x) { return exp(x); }, false},
      {"log", [](const Tensor& x) { return log(x); }, true},
      {"sigmoid", [](const Tensor& x) { return sigmoid(x); }, false},
      {"silu", [](const Tensor& x) { return silu(x); }, false},
      {"softplus", [](const Tensor& x) { return softplus(x); }, false},
      {"gelu", [](const Tensor& x) { return gelu(x); }, false},
      {"relu", [](const Tensor& x) { return relu(x); }, false},
      {"sqrt", [](const Tensor& x) { return sqrt(x); }, true},
      {"rsqrt", [](const Tensor& x) { return rsqrt(x); }, true},
      {"square", [](const Tensor& x) { return square(x); }, false},
      {"tanh", [](const Tensor& x) { return tanh(x); }, false},
      {"pow", [](const Tensor& x) { return pow(x, 1.5); }, true},
      {"affine", [](const Tensor& x) { return affine(x, -2.0, 0.5); }, false},
      {"neg", [](const Tensor& x) { return neg(x); }, false}};
  for (const Shape& s : {Shape{7, 13, 5}, Shape{1}, Shape{1031}, Shape{64, 256}, Shape{3, 1000, 8}})
    for (DType t : kTypes)
      for (const U& u : ops)
        check_op(
            u.name, [&](const std::vector<Tensor>& in) { return std::vector<Tensor>{u.f(in[0])}; },
            {u.positive ? positive(s, 1) : rnd(s, 1, 2.0)}, {true}, t);
}

// BlockFFN's fused auxiliary losses (kernels/moe_aux.h) at odd shapes: experts 3 and 8, groups that
// leave chunks over, chunks of 1 and 8 tokens, with and without the next shard's logits.
TEST(CudaOps, MoeAuxMatchesCpu) {
  HYDRA_REQUIRE_GPU();
  struct Case {
    int64_t B, nC, E, chunk, group;
    bool next;
  };
  for (const Case& c : {Case{2, 5, 3, 1, 2, false}, Case{3, 7, 8, 8, 3, true},
                        Case{1, 1, 8, 8, 1, false}, Case{4, 130, 8, 8, 4, true}})
    for (DType t : kTypes) {
      MoeAuxOptions o;
      o.chunk_len = c.chunk;
      o.group = c.group;
      o.alpha = 1.3;
      o.balance_scale = double(c.E) / double(c.B * c.nC);
      o.locality_scale = 1.0 / double(c.B * c.nC * c.E);
      o.sparsity_scale = 1.0 / double(c.B * std::max<int64_t>(c.nC / c.group, 1) * c.E);
      o.weights[0] = 0.5;
      o.weights[1] = 2.0;
      o.weights[2] = 3.0;
      const bool next = c.next;
      check_op(
          "moe_aux B " + std::to_string(c.B) + " chunks " + std::to_string(c.nC) + " E " +
              std::to_string(c.E),
          [o, next](const std::vector<Tensor>& in) {
            return std::vector<Tensor>{
                moe_aux(in[0], in[1], in[2], in[3], next ? in[4] : Tensor(), o)};
          },
          {rnd({c.B, c.nC, c.E}, 60, 2.0), positive({c.B, c.nC, c.E}, 61),
           positive({c.B, c.nC, c.E}, 62), positive({c.E}, 63), rnd({c.B, c.E}, 64, 2.0)},
          {true, true, true, false, false}, t);
    }
}

// The MoE's fused combine on a routing from moe_route (packed with drops, tiled with padding
// rows), rows of packs (384) and of odd widths (37: the per-element kernels).
TEST(CudaOps, MoeCombineMatchesCpu) {
  HYDRA_REQUIRE_GPU();
  struct Case {
    int64_t B, nC, E, chunk, C, tile, capacity;
  };
  for (const Case& c : {Case{2, 5, 4, 3, 37, 0, 2}, Case{3, 7, 8, 8, 384, 16, 0},
                        Case{1, 9, 8, 8, 37, 64, 0}, Case{4, 33, 8, 8, 384, 0, 0}}) {
    Generator g(70);
    const Tensor raw = randn({c.B * c.nC, c.E}, g);
    const MoeDispatch d = moe_route(raw, relu(raw), c.B, c.chunk, 2, c.capacity, c.tile);
    const int64_t rows = d.perm.numel(), pairs = c.B * c.nC * c.E, E = c.E, chunk = c.chunk;
    for (DType t : kTypes)
      check_op(
          "moe_combine rows " + std::to_string(rows) + " C " + std::to_string(c.C) + " tile " +
              std::to_string(c.tile),
          [E, chunk](const std::vector<Tensor>& in) {
            return std::vector<Tensor>{moe_combine(in[0], in[1], in[2], in[3], in[4], E, chunk)};
          },
          {rnd({rows, c.C}, 71), rnd({pairs}, 72), d.inverse, d.widx, d.perm},
          {true, true, false, false, false}, t);
  }
}

TEST(CudaOps, BinaryWithBroadcastingMatchCpu) {
  HYDRA_REQUIRE_GPU();
  const std::vector<std::pair<Shape, Shape>> shapes = {{{7, 13, 5}, {7, 13, 5}},
                                                       {{7, 13, 5}, {13, 1}},
                                                       {{7, 1, 5}, {13, 5}},
                                                       {{1}, {7, 13, 5}},
                                                       {{4096}, {4096}}};
  for (const auto& [a, b] : shapes)
    for (DType t : kTypes) {
      check_op(
          "add",
          [](const std::vector<Tensor>& in) { return std::vector<Tensor>{add(in[0], in[1])}; },
          {rnd(a, 2), rnd(b, 3)}, {true, true}, t);
      check_op(
          "sub",
          [](const std::vector<Tensor>& in) { return std::vector<Tensor>{sub(in[0], in[1])}; },
          {rnd(a, 4), rnd(b, 5)}, {true, true}, t);
      check_op(
          "mul",
          [](const std::vector<Tensor>& in) { return std::vector<Tensor>{mul(in[0], in[1])}; },
          {rnd(a, 6), rnd(b, 7)}, {true, true}, t);
      check_op(
          "div",
          [](const std::vector<Tensor>& in) { return std::vector<Tensor>{div(in[0], in[1])}; },
          {rnd(a, 8), positive(b, 9)}, {true, true}, t);
    }
}

// The fast paths of this session's element-wise kernels, at shapes that take them and at ones that
// just miss them (odd widths, misaligned slices): broadcasts over rows or columns (16-byte packs),
// strided copies by rows (a warp per row; vectors when dtypes agree and rows are aligned), and
// short rows reduced by a warp (sum and max).
TEST(CudaOps, ElementwiseFastPathsMatchCpu) {
  HYDRA_REQUIRE_GPU();
  for (DType t : kTypes) {
    const std::vector<std::pair<Shape, Shape>> shapes = {
        {{300, 64}, {64}},
        {{300, 64}, {300, 1}},
        {{64}, {300, 64}},
        {{300, 1}, {300, 64}},
        {{3, 100, 40}, {40}},
        {{301, 24}, {301, 1}},
        {{2, 150, 64}, {1}},
        // three dimensions: a chunk's vector to each of its tokens, a per-(chunk, token) scalar
        {{37, 8, 48}, {37, 1, 48}},
        {{37, 1, 48}, {37, 5, 48}},
        {{37, 5, 48}, {37, 5, 1}},
        {{5, 37, 48}, {1, 37, 48}}};
    for (const auto& [a, b] : shapes)
      check_op(
          "mul fast path " + shape_str(a) + " x " + shape_str(b),
          [](const std::vector<Tensor>& in) { return std::vector<Tensor>{mul(in[0], in[1])}; },
          {rnd(a, 16), rnd(b, 17)}, {true, true}, t);
    // b a slice one element off: not 16-byte aligned, the element-wise kernel.
    check_op(
        "mul misaligned",
        [](const std::vector<Tensor>& in) {
          return std::vector<Tensor>{mul(in[0], in[1].narrow(0, 1, 64))};
        },
        {rnd({300, 64}, 18), rnd({65}, 19)}, {true, true}, t);
    // Copies of slices of the last dimension: aligned (vectors), misaligned (scalars), short rows.
    for (const auto& [start, len] :
         std::vector<std::pair<int64_t, int64_t>>{{8, 64}, {1, 64}, {3, 33}, {0, 20}})
      check_op(
          "copy slice " + std::to_string(start) + "+" + std::to_string(len),
          [start = start, len = len](const std::vector<Tensor>& in) {
            return std::vector<Tensor>{in[0].narrow(2, start, len).contiguous()};
          },
          {rnd({70, 3, 96}, 20)}, {true}, t);
    // Many short rows: a warp each.
    check_op(
        "sum short rows",
        [](const std::vector<Tensor>& in) { return std::vector<Tensor>{sum(in[0], {2})}; },
        {rnd({131, 4, 37}, 21)}, {true}, t);
  }
  // Strided rows converted between dtypes (the scalar rows path) and a contiguous copy (memcpy).
  const Tensor x = rnd({70, 3, 96}, 22), d = x.to(Device::cuda(0));
  EXPECT_TRUE(testing::bitwise_equal(d.narrow(2, 5, 80).to(DType::kBF16).cpu(),
                                     x.narrow(2, 5, 80).to(DType::kBF16)));
  EXPECT_TRUE(testing::bitwise_equal(d.clone().cpu(), x));
  // Max over many short rows (the warp path's other combine).
  const Tensor y = rnd({500, 37}, 23);
  EXPECT_LT(testing::rel_error(amax(y.to(Device::cuda(0)), 1).cpu(), amax(y, 1)), 1e-7);
}

TEST(CudaOps, ReductionsMatchCpu) {
  HYDRA_REQUIRE_GPU();
  for (DType t : kTypes) {
    for (const std::vector<int64_t>& axes :
         std::vector<std::vector<int64_t>>{{0}, {1}, {2}, {0, 2}, {}})
      check_op(
          "sum",
          [&](const std::vector<Tensor>& in) { return std::vector<Tensor>{sum(in[0], axes)}; },
          {rnd({7, 13, 5}, 10)}, {true}, t);
    // Few long rows (chunked partials), many short ones, few long columns.
    check_op(
        "sum long rows",
        [](const std::vector<Tensor>& in) { return std::vector<Tensor>{sum(in[0], {1})}; },
        {rnd({3, 100003}, 11)}, {true}, t);
    check_op(
        "mean columns",
        [](const std::vector<Tensor>& in) { return std::vector<Tensor>{mean(in[0], {0})}; },
        {rnd({5000, 37}, 12)}, {true}, t);
    check_op(
        "sum all", [](const std::vector<Tensor>& in) { return std::vector<Tensor>{sum(in[0])}; },
        {rnd({1, 300001}, 13)}, {true}, t);
    // More rows than a grid's y dimension takes (65535).
    check_op(
        "sum many rows",
        [](const std::vector<Tensor>& in) { return std::vector<Tensor>{sum(in[0], {1})}; },
        {rnd({70001, 3}, 15)}, {true}, t);
  }
  const Tensor x = rnd({123, 45}, 14);
  EXPECT_LT(testing::rel_error(sum_squares(x.to(Device::cuda(0))).cpu(), sum_squares(x)), 1e-6);
  EXPECT_LT(testing::rel_error(amax(x.to(Device::cuda(0)), 1).cpu(), amax(x, 1)), 1e-7);
}

TEST(CudaOps, MatmulAndLinearMatchCpu) {
  HYDRA_REQUIRE_GPU();
  for (DType t : kTypes) {
    check_op(
        "matmul",
        [](const std::vector<Tensor>& in) { return std::vector<Tensor>{matmul(in[0], in[1])}; },
        {rnd({7, 13}, 15), rnd({13, 5}, 16)}, {true, true}, t);
    check_op(
        "matmul batched",
        [](const std::vector<Tensor>& in) { return std::vector<Tensor>{matmul(in[0], in[1])}; },
        {rnd({3, 64, 129}, 17), rnd({3, 129, 65}, 18)}, {true, true}, t);
    check_op(
        "matmul transposed",
        [](const std::vector<Tensor>& in) {
          return std::vector<Tensor>{matmul(in[0].transpose(0, 1), in[1])};
        },
        {rnd({33, 17}, 19), rnd({33, 9}, 20)}, {true, true}, t);
    check_op(
        "linear+bias",
        [](const std::vector<Tensor>& in) {
          return std::vector<Tensor>{linear(in[0], in[1], in[2])};
        },
        {rnd({2, 37, 96}, 21), rnd({80, 96}, 22, 0.1), rnd({80}, 23)}, {true, true, true}, t);
    check_op(
        "linear",
        [](const std::vector<Tensor>& in) { return std::vector<Tensor>{linear(in[0], in[1])}; },
        {rnd({1000, 256}, 24), rnd({512, 256}, 25, 0.05)}, {true, true}, t);
    // One grouped launch over the experts; an empty group; two rounds of groups per expert (as
    // expert parallelism delivers them), whose weight gradients add up.
    for (const std::vector<int64_t>& sizes :
         {std::vector<int64_t>{37, 0, 5, 64}, std::vector<int64_t>{3, 0, 17, 8, 0, 21, 1, 9}}) {
      int64_t rows = 0;
      for (int64_t n : sizes) rows += n;
      check_op(
          "grouped_linear",
          [&](const std::vector<Tensor>& in) {
            return std::vector<Tensor>{grouped_linear(in[0], in[1], sizes)};
          },
          {rnd({rows, 72}, 26), rnd({4, 40, 72}, 27, 0.1)}, {true, true}, t);
    }
    // The tiled layout: tiles of 16 rows over 4 experts (one empty), a partly padded last tile
    // per group and two tiles past the groups.
    {
      TiledGroups g;
      g.tile = 16;
      g.tiles = tensor(std::vector<int64_t>{0, 0, 0, 2, 3, 3, -1, -1}, {8});
      g.sizes = [] { return std::vector<int64_t>{37, 0, 16, 21}; };
      TiledGroups gg = g;
      gg.tiles = g.tiles.to(Device::cuda(0));
      const Tensor x = rnd({128, 72}, 30), w = rnd({4, 40, 72}, 31, 0.1);
      check_op(
          "tiled_linear",
          [&](const std::vector<Tensor>& in) {
            return std::vector<Tensor>{
                tiled_linear(in[0], in[1], in[0].device().is_cuda() ? gg : g)};
          },
          {x, w}, {true, true}, t);
      // x read by two of them: the second adds its input gradient into the first's (beta = 1).
      check_op(
          "tiled_linear twice",
          [&](const std::vector<Tensor>& in) {
            const TiledGroups& on = in[0].device().is_cuda() ? gg : g;
            return std::vector<Tensor>{
                concat({tiled_linear(in[0], in[1], on), tiled_linear(in[0], in[2], on)}, 1)};
          },
          {x, w, rnd({4, 24, 72}, 32, 0.1)}, {true, true, true}, t);
    }
    // Groups of many rows (and padding rows that must not count) with a small output: the weight
    // gradients run as one cuBLASLt GEMM per group.
    {
      TiledGroups g;
      g.tile = 128;
      std::vector<int64_t> tiles(12, 0);
      tiles.insert(tiles.end(), 6, 2);
      tiles.push_back(-1);
      g.tiles = tensor(tiles, {static_cast<int64_t>(tiles.size())});
      g.sizes = [] { return std::vector<int64_t>{1500, 0, 700}; };
      TiledGroups gg = g;
      gg.tiles = g.tiles.to(Device::cuda(0));
      const Tensor x = rnd({static_cast<int64_t>(tiles.size()) * 128, 72}, 32),
                   w = rnd({3, 40, 72}, 33, 0.1);
      check_op(
          "tiled_linear long groups",
          [&](const std::vector<Tensor>& in) {
            return std::vector<Tensor>{
                tiled_linear(in[0], in[1], in[0].device().is_cuda() ? gg : g)};
          },
          {x, w}, {true, true}, t);
    }
    // Problems above 2 GFLOP each run as one cuBLASLt GEMM apiece instead of the grouped launch.
    const std::vector<int64_t> big = {1100, 1100, 1100};
    check_op(
        "grouped_linear large",
        [&](const std::vector<Tensor>& in) {
          return std::vector<Tensor>{grouped_linear(in[0], in[1], big)};
        },
        {rnd({3300, 1024}, 28), rnd({3, 1000, 1024}, 29, 0.03)}, {true, true}, t);
  }
  // f64 (float64 grids on the GPU against the CPU): cuBLAS's f64 GEMM and a separate bias kernel.
  check_op(
      "linear+bias f64",
      [](const std::vector<Tensor>& in) {
        return std::vector<Tensor>{linear(in[0], in[1], in[2])};
      },
      {rnd({2, 37, 96}, 21), rnd({80, 96}, 22, 0.1), rnd({80}, 23)}, {true, true, true},
      DType::kF64);
}

// The block's norms in one op: packs (384, 512), elements (37, 100), 1 to 4 weights, an output
// without a gradient (its weight gets none, as from rms_norm); and a width the kernels do not take
// (2048), which runs as single norms.
TEST(CudaOps, RmsNormMultiMatchesCpu) {
  HYDRA_REQUIRE_GPU();
  for (DType t : kTypes)
    for (const Shape& s :
         {Shape{7, 37}, Shape{1000, 384}, Shape{3, 5, 100}, Shape{37, 512}, Shape{9, 2048}}) {
      const int64_t d = s.back();
      for (const int count : {1, 3, 4}) {
        std::vector<Tensor> in = {rnd(s, 40)};
        for (int k = 0; k < count; ++k) in.push_back(rnd({d}, 41 + k));
        check_op(
            "rms_norm_multi " + std::to_string(count) + " x " + std::to_string(d),
            [count](const std::vector<Tensor>& v) {
              std::vector<Tensor> ws(v.begin() + 1, v.begin() + 1 + count);
              return rms_norm_multi(v[0], ws, 1e-5);
            },
            in, std::vector<bool>(count + 1, true), t);
      }
      check_op(
          "rms_norm_multi, output 0 without a gradient",
          [](const std::vector<Tensor>& v) {
            return std::vector<Tensor>{rms_norm_multi(v[0], {v[1], v[2]}, 1e-5)[1]};
          },
          {rnd(s, 50), rnd({d}, 51), rnd({d}, 52)}, {true, false, true}, t);
      check_op(
          "rms_norm_multi, x also read by a later op (the norm adds into its gradient sum)",
          [](const std::vector<Tensor>& v) {
            std::vector<Tensor> ys = rms_norm_multi(v[0], {v[1], v[2]}, 1e-5);
            ys.push_back(mul(v[0], 3.0));
            return ys;
          },
          {rnd(s, 53), rnd({d}, 54), rnd({d}, 55)}, {true, true, true}, t);
    }
}

TEST(CudaOps, NormSoftmaxCrossEntropyMatchCpu) {
  HYDRA_REQUIRE_GPU();
  for (DType t : kTypes) {
    // Element-wise paths (odd widths), warp-per-row (<= 256 packs; row counts not a multiple of 8)
    // and block-per-row layouts (up to 8 packs per thread), and many rows per rms_norm backward
    // block.
    for (const Shape& s : {Shape{7, 13}, Shape{1000, 2048}, Shape{3, 5, 33}, Shape{37, 384},
                           Shape{5, 8200}, Shape{3, 65536}, Shape{2100, 64}}) {
      check_op(
          "rms_norm",
          [](const std::vector<Tensor>& in) { return std::vector<Tensor>{rms_norm(in[0], in[1])}; },
          {rnd(s, 26), rnd({s.back()}, 27)}, {true, true}, t);
      check_op(
          "softmax",
          [](const std::vector<Tensor>& in) { return std::vector<Tensor>{softmax(in[0])}; },
          {rnd(s, 28, 3.0)}, {true}, t);
      check_op(
          "log_softmax",
          [](const std::vector<Tensor>& in) { return std::vector<Tensor>{log_softmax(in[0])}; },
          {rnd(s, 29, 3.0)}, {true}, t);
    }
    // Masked rows: threads (or lanes) whose values are all -inf, and a row with a single finite
    // value.
    for (const Shape& s : {Shape{9, 384}, Shape{4, 2048}, Shape{3, 8200}, Shape{5, 40}}) {
      std::vector<float> v = rnd(s, 32, 3.0).to_vector<float>();
      const int64_t cols = s.back();
      for (int64_t i = 0; i < static_cast<int64_t>(v.size()); ++i) {
        const int64_t r = i / cols, c = i % cols;
        if (c < cols / 2 + r || (r == 1 && c != cols - 1)) v[i] = -INFINITY;
      }
      check_op(
          "softmax masked",
          [](const std::vector<Tensor>& in) { return std::vector<Tensor>{softmax(in[0])}; },
          {tensor(v, s)}, {true}, t);
    }
    // Aligned rows (128-thread blocks up to 2048 packs, 256 beyond: 9 x 50304) and unaligned
    // (1001).
    for (const auto& [rows, vocab] :
         {std::pair<int64_t, int64_t>{333, 1000}, {50, 1001}, {9, 50304}, {13, 8192}}) {
      std::vector<int64_t> targets(rows);
      for (int64_t i = 0; i < rows; ++i) targets[i] = i % 7 == 0 ? -100 : (i * 37) % vocab;
      for (Reduction r : {Reduction::kMean, Reduction::kSum, Reduction::kNone})
        check_op(
            "cross_entropy",
            [r](const std::vector<Tensor>& in) {
              return std::vector<Tensor>{cross_entropy(in[0], in[1], -100, r)};
            },
            {rnd({rows, vocab}, 30, 2.0), tensor(targets, {rows})}, {true, false}, t);
    }
  }
}

// On the GPU the targets are not read back to the host: the mean's denominator is counted on the
// device (every row ignored gives 0, as on the CPU), and a target outside the vocabulary makes the
// loss and that row's gradients NaN.
TEST(CudaOps, CrossEntropyTargetsStayOnTheDevice) {
  HYDRA_REQUIRE_GPU();
  const Device gpu = Device::cuda(0);
  Tensor logits = rnd({4, 24}, 31, 2.0).to(gpu);
  const Tensor ignored = tensor<int64_t>({-100, -100, -100, -100}, {4}).to(gpu);
  EXPECT_EQ(cross_entropy(logits, ignored, -100, Reduction::kMean).cpu().item<float>(), 0.0f);
  logits.set_requires_grad(true);
  const Tensor bad = tensor<int64_t>({3, 24, -100, 5}, {4}).to(gpu);
  Tensor loss = cross_entropy(logits, bad, -100, Reduction::kMean);
  EXPECT_TRUE(std::isnan(loss.cpu().item<float>()));
  loss.backward();
  const std::vector<float> g = logits.grad().cpu().to_vector<float>();
  for (int64_t j = 0; j < 24; ++j) {
    EXPECT_TRUE(std::isnan(g[24 + j])) << j;  // row 1: target 24 is outside [0, 24)
    EXPECT_EQ(g[2 * 24 + j], 0.0f) << j;      // row 2: ignored
  }
  EXPECT_FALSE(std::isnan(g[0]));
}

TEST(CudaOps, IndexingMatchCpu) {
  HYDRA_REQUIRE_GPU();
  Generator g(31);
  const Tensor idx = randint(0, 1000, {7, 111}, g), rows = randint(0, 13, {77}, g),
               long_rows = randint(0, 7, {5000}, g);
  for (DType t : kTypes) {
    check_op(
        "embedding",
        [&](const std::vector<Tensor>& in) { return std::vector<Tensor>{embedding(in[0], in[1])}; },
        {rnd({1000, 96}, 32), idx}, {true, false}, t);
    check_op(
        "scatter_add_rows",
        [&](const std::vector<Tensor>& in) {
          return std::vector<Tensor>{scatter_add_rows(in[0], in[2], in[1])};
        },
        {rnd({13, 20}, 33), rnd({77, 20}, 34), rows}, {true, true, false}, t);
    // Runs of ~700 equal rows cross many tiles of the segmented sum (and end inside them).
    check_op(
        "scatter_add_rows (long runs)",
        [&](const std::vector<Tensor>& in) {
          return std::vector<Tensor>{scatter_add_rows(in[0], in[2], in[1])};
        },
        {rnd({9, 20}, 43), rnd({5000, 20}, 44), long_rows}, {true, true, false}, t);
    const Tensor aidx = randint(0, 13, {7, 9, 5}, g);
    check_op(
        "gather",
        [&](const std::vector<Tensor>& in) { return std::vector<Tensor>{gather(in[0], 1, in[1])}; },
        {rnd({7, 13, 5}, 35), aidx}, {true, false}, t);
    check_op(
        "scatter_add",
        [&](const std::vector<Tensor>& in) {
          return std::vector<Tensor>{scatter_add(in[0], 1, in[2], in[1])};
        },
        {rnd({7, 13, 5}, 36), rnd({7, 9, 5}, 37), aidx}, {true, true, false}, t);
    // Along the last axis (a warp per row): repeated indices, more entries than a warp's 32.
    const Tensor lidx = randint(0, 50, {37, 70}, g);
    check_op(
        "scatter_add last axis",
        [&](const std::vector<Tensor>& in) {
          return std::vector<Tensor>{scatter_add(in[0], 1, in[2], in[1])};
        },
        {rnd({37, 50}, 63), rnd({37, 70}, 64), lidx}, {true, true, false}, t);
    check_op(
        "topk",
        [](const std::vector<Tensor>& in) { return std::vector<Tensor>{topk(in[0], 5).first}; },
        {rnd({7, 13}, 38)}, {true}, t);
    check_op(
        "topk wide",
        [](const std::vector<Tensor>& in) { return std::vector<Tensor>{topk(in[0], 32).first}; },
        {rnd({3, 512}, 39)}, {true}, t);
    check_op(
        "concat/split",
        [](const std::vector<Tensor>& in) {
          auto parts = split(concat({in[0], in[1]}, 1), {4, 9}, 1);
          return std::vector<Tensor>{exp(parts[0]), parts[1].transpose(0, 1).contiguous()};
        },
        {rnd({7, 6}, 40), rnd({7, 7}, 41)}, {true, true}, t);
    check_op(
        "embedding_bag",
        [&](const std::vector<Tensor>& in) {
          return std::vector<Tensor>{embedding_bag(in[0], in[2], in[1])};
        },
        {rnd({50, 24}, 42), rnd({17, 6}, 43), randint(0, 50, {17, 6}, g)}, {true, true, false}, t);
    // The sums row by row (tables of more than 64 rows a lookup: kernels/pkm.h): rows of 16-byte
    // packs summed by warps (1 to 8 packs per lane), rows that take the scalar kernel (37 columns;
    // 2056 columns: too wide for the packed sums), and rows looked up ~530 times (several staged
    // chunks per row in the table gradient: 520 rows, 20000 bags). The dense form (GEMMs; tables of
    // few rows): odd row and column counts, tokens that look one row up several times (rows 6 and 3
    // with 8 lookups).
    struct BagCase {
      int64_t rows, cols, bags, m;
    };
    for (const BagCase& c :
         {BagCase{500, 37, 17, 6}, BagCase{400, 1000, 23, 5}, BagCase{300, 2056, 9, 4},
          BagCase{520, 64, 20000, 8}, BagCase{50, 37, 17, 6}, BagCase{40, 1000, 23, 5},
          BagCase{33, 200, 9, 4}, BagCase{6, 64, 400, 8}, BagCase{3, 24, 77, 8}})
      check_op(
          "embedding_bag " + std::to_string(c.cols) + " columns",
          [&](const std::vector<Tensor>& in) {
            return std::vector<Tensor>{embedding_bag(in[0], in[2], in[1])};
          },
          {rnd({c.rows, c.cols}, 48), rnd({c.bags, c.m}, 49), randint(0, c.rows, {c.bags, c.m}, g)},
          {true, true, false}, t);
  }
  // The row-sparse table gradient (PKM values): many lookups per row, summed per row on the device;
  // rows past `looked` are never looked up and must not appear among the gradient's rows. 1500
  // rows: summed row by row; 200: the dense form.
  for (const auto& [rows, looked] : {std::pair<int64_t, int64_t>{1500, 1200}, {200, 160}})
    for (DType t : kTypes) {
      const Tensor bag_idx = randint(0, looked, {300, 16}, g);
      const Tensor table = rnd({rows, 40}, 45), w = rnd({300, 16}, 46), r = rnd({300, 40}, 47);
      auto run = [&](Device dev) {  // the CPU computes in f32 on the values the GPU sees
        auto in = [&](const Tensor& v) {
          return dev.is_cpu() ? v.to(t).to(DType::kF32) : v.to(t).to(dev);
        };
        Tensor leaf = in(table).detach().clone();
        leaf.set_requires_grad(true);
        sum(mul(embedding_bag(leaf, bag_idx.to(dev), in(w), /*sparse_grad=*/true), in(r)))
            .backward();
        return std::make_pair(leaf.sparse_grad()->rows.cpu().to_vector<int64_t>(),
                              densify_sparse_grad(leaf).to(DType::kF32).cpu());
      };
      const auto [cpu_rows, cpu_grad] = run(Device::cpu());
      const auto [gpu_rows, gpu_grad] = run(Device::cuda(0));
      EXPECT_EQ(gpu_rows, cpu_rows) << dtype_name(t) << ", " << rows << " rows";
      EXPECT_LE(cpu_rows.back(), looked - 1);
      EXPECT_LT(testing::rel_error(gpu_grad, cpu_grad), tolerance(t))
          << "sparse embedding_bag gradient " << dtype_name(t);
    }
  // Product-key indices: exact, with the grid's cells and through a list of cells.
  const Tensor pa = randint(0, 9, {3, 5, 4}, g), pb = randint(0, 9, {3, 5, 4}, g),
               pick = randint(0, 16, {3, 5, 6}, g);
  EXPECT_EQ(product_key_indices(pa.to(Device::cuda(0)), pb.to(Device::cuda(0)),
                                pick.to(Device::cuda(0)), 9)
                .cpu()
                .to_vector<int64_t>(),
            product_key_indices(pa, pb, pick, 9).to_vector<int64_t>());
  const Tensor cells = tensor<int64_t>({0, 1, 2, 3, 4, 5, 8, 12, 15}, {9}),
               cpick = randint(0, 9, {3, 5, 6}, g);
  EXPECT_EQ(product_key_indices(pa.to(Device::cuda(0)), pb.to(Device::cuda(0)),
                                cpick.to(Device::cuda(0)), 9, cells.to(Device::cuda(0)))
                .cpu()
                .to_vector<int64_t>(),
            product_key_indices(pa, pb, cpick, 9, cells).to_vector<int64_t>());
  // The MoE combine's gather-sum (rows named up to 3 times, some never; packed and odd widths).
  // The table is read through a view and also squared: gather_rows' backward adds into its
  // gradient summed so far (gradient_sum_target, the kernel's accumulate).
  for (int64_t cols : {20, 384, 7}) {
    std::vector<int64_t> iv, inv(50 * 3, -1), filled(50, 0);
    const std::vector<int64_t> named = randint(0, 50, {90}, g).to_vector<int64_t>();
    for (int64_t r : named)
      if (filled[r] < 3) {
        inv[r * 3 + filled[r]++] = static_cast<int64_t>(iv.size());
        iv.push_back(r);
      }
    const Tensor index = tensor(iv, {static_cast<int64_t>(iv.size())}),
                 inverse = tensor(inv, {50, 3});
    for (DType t : kTypes)
      check_op(
          "gather_sum_rows",
          [&](const std::vector<Tensor>& in) {
            return std::vector<Tensor>{gather_sum_rows(in[0], in[1], in[2]),
                                       gather_rows(in[3].view({50, cols}), in[2], in[1]),
                                       mul(in[3], in[3])};
          },
          {rnd({index.numel(), cols}, 46 + cols), inverse, index, rnd({5, 10, cols}, 47 + cols)},
          {true, false, false, true}, t);
  }
  // Indices agree exactly in f32: warp layouts (4 to 32 items per lane), the block layout (> 1024
  // columns), and rows with many ties (values rounded to bf16), which go to the lower index.
  // The bitonic layout takes rows of up to 256 (1 to 8 items per lane): widths below, at and above
  // each of its sizes, and k up to the whole row.
  for (const Shape& s : {Shape{5, 3}, Shape{9, 32}, Shape{11, 33}, Shape{40, 64}, Shape{13, 119},
                         Shape{7, 128}, Shape{6, 200}, Shape{5, 256}}) {
    const Tensor x = rnd(s, 43);
    for (const int64_t k : {int64_t{1}, std::min<int64_t>(s[1], 32), s[1]}) {
      const auto [gv, gi] = topk(x.to(Device::cuda(0)), k);
      const auto [cv, ci] = topk(x, k);
      EXPECT_EQ(gi.cpu().to_vector<int64_t>(), ci.to_vector<int64_t>())
          << shape_str(s) << " k " << k;
      EXPECT_EQ(gv.cpu().to_vector<float>(), cv.to_vector<float>()) << shape_str(s) << " k " << k;
    }
    const Tensor tied = rnd(s, 45, 0.01).to(DType::kBF16);  // many ties, in bf16
    EXPECT_EQ(topk(tied.to(Device::cuda(0)), 1).second.cpu().to_vector<int64_t>(),
              topk(tied.to(DType::kF32), 1).second.to_vector<int64_t>())
        << shape_str(s);
    EXPECT_EQ(topk(tied.to(Device::cuda(0)), s[1]).second.cpu().to_vector<int64_t>(),
              topk(tied.to(DType::kF32), s[1]).second.to_vector<int64_t>())
        << shape_str(s);
  }
  for (const Shape& s : {Shape{7, 513}, Shape{9, 100}, Shape{17, 1024}, Shape{3, 1500}}) {
    const Tensor x = rnd(s, 44);
    EXPECT_EQ(topk(x.to(Device::cuda(0)), 9).second.cpu().to_vector<int64_t>(),
              topk(x, 9).second.to_vector<int64_t>())
        << shape_str(s);
  }
  const Tensor ties = rnd({5, 700}, 48, 0.01).to(DType::kBF16).to(DType::kF32);
  EXPECT_EQ(topk(ties.to(Device::cuda(0)), 40).second.cpu().to_vector<int64_t>(),
            topk(ties, 40).second.to_vector<int64_t>());
}

TEST(CudaOps, CausalConv1dMatchCpu) {
  HYDRA_REQUIRE_GPU();
  for (DType t : kTypes) {
    check_op(
        "causal_conv1d",
        [](const std::vector<Tensor>& in) {
          return std::vector<Tensor>{causal_conv1d(in[0], in[1], in[2], in[3], true)};
        },
        {rnd({2, 37, 19}, 45), rnd({19, 4}, 46), rnd({19}, 47), rnd({2, 3, 19}, 48)},
        {true, true, true, true}, t);
    check_op(
        "causal_conv1d plain",
        [](const std::vector<Tensor>& in) {
          return std::vector<Tensor>{causal_conv1d(in[0], in[1], Tensor())};
        },
        {rnd({3, 300, 256}, 49), rnd({256, 4}, 50)}, {true, true}, t);
    check_op(
        "causal_conv1d rows apart",  // x a part of wider rows (read in place)
        [](const std::vector<Tensor>& in) {
          return std::vector<Tensor>{
              causal_conv1d(in[0].narrow(2, 5, 19), in[1], in[2], in[3], true)};
        },
        {rnd({2, 137, 45}, 58), rnd({19, 4}, 46), rnd({19}, 47), rnd({2, 3, 19}, 48)},
        {true, true, true, true}, t);
    // Even channels take the two-channels-a-thread forward when the rows and pointers allow pairs:
    // a slice at an even offset of even rows (pairs), at an odd offset (one channel a thread).
    for (const int64_t offset : {6, 5})
      check_op(
          "causal_conv1d pairs, offset " + std::to_string(offset),
          [offset](const std::vector<Tensor>& in) {
            return std::vector<Tensor>{
                causal_conv1d(in[0].narrow(2, offset, 22), in[1], in[2], in[3], true)};
          },
          {rnd({3, 141, 46}, 59), rnd({22, 4}, 60), rnd({22}, 61), rnd({3, 3, 22}, 62)},
          {true, true, true, true}, t);
    // Every width the kernels take (a template argument each), sequences shorter than the width and
    // than the kernels' 64-step segments, and longer than two of them, with and without a prefix.
    for (const int64_t W : {1, 2, 3, 5, 8})
      for (const int64_t L : {1, 6, 129}) {
        check_op(
            "causal_conv1d W " + std::to_string(W) + " L " + std::to_string(L),
            [](const std::vector<Tensor>& in) {
              return std::vector<Tensor>{causal_conv1d(in[0], in[1], in[2], in[3], true)};
            },
            {rnd({2, L, 33}, 51), rnd({33, W}, 52), rnd({33}, 53), rnd({2, W - 1, 33}, 54)},
            {true, true, true, W > 1}, t);
        check_op(
            "causal_conv1d no prefix W " + std::to_string(W) + " L " + std::to_string(L),
            [](const std::vector<Tensor>& in) {
              return std::vector<Tensor>{causal_conv1d(in[0], in[1], in[2], Tensor(), false)};
            },
            {rnd({3, L, 130}, 55), rnd({130, W}, 56), rnd({130}, 57)}, {true, true, true}, t);
      }
  }
}

TEST(CudaOps, RopeMatchesCpu) {
  HYDRA_REQUIRE_GPU();
  for (DType t : kTypes) {
    check_op(
        "rope",
        [](const std::vector<Tensor>& in) { return std::vector<Tensor>{rope(in[0], 5, 10000.0)}; },
        {rnd({2, 37, 3, 16}, 60)}, {true}, t);
    // Long positions (angles of thousands of radians) and heads that are a slice of a wider tensor.
    check_op(
        "rope strided",
        [](const std::vector<Tensor>& in) {
          return std::vector<Tensor>{rope(split(in[0], {6, 6}, 2)[0], 3000, 500000.0)};
        },
        {rnd({1, 301, 12, 64}, 61)}, {true}, t);
  }
}

// bf16 with head sizes that are multiples of 16 runs on tensor cores (attention_mma.cu).
TEST(CudaOps, SparseAttentionMatchesCpu) {
  HYDRA_REQUIRE_GPU();
  const testing::ScopedEnv ours("HYDRA_ATTENTION", "ours");  // our kernels, never cuDNN's
  struct Case {
    int64_t B, Lq, Lk, H, dh, window, stride, q_pos0, k_pos0;
  };
  const std::vector<Case> cases = {
      {2, 37, 37, 3, 16, 0, 0, 0, 0},      // dense causal, odd length
      {1, 129, 129, 2, 64, 16, 0, 0, 0},   // window only: tiles skip keys
      {2, 100, 100, 3, 48, 20, 13, 0, 0},  // window + global keys and queries
      {1, 70, 70, 2, 32, 5, 1, 0, 0},      // every position global
      {2, 33, 61, 2, 16, 9, 8, 40, 12},    // a query shard against keys from elsewhere
      {1, 40, 40, 1, 128, 64, 32, 0, 0},   // the 1.6B head size
      {2, 45, 45, 2, 24, 10, 7, 0, 0},     // bf16 head size not a multiple of 16: the SIMT kernel
      // Several 64-row tiles: tiles inside the pattern (no per-pair test), tiles on its edges,
      // tiles of global keys, partial tiles; head sizes below the compiled width (48 in 64, 96 in
      // 128).
      {1, 300, 300, 2, 64, 100, 64, 0, 0},
      {1, 257, 200, 2, 96, 70, 50, 120, 20},
      {2, 190, 190, 1, 48, 0, 0, 0, 0},
      {1, 200, 200, 2, 128, 0, 0, 0, 0},
      // Global positions further apart than a tile: a tile holding one global query (key) walks
      // every earlier key (later query) while the others walk their band; also with the queries a
      // shard further on.
      {1, 600, 600, 2, 64, 40, 200, 0, 0},
      {1, 520, 520, 2, 128, 48, 160, 0, 0},
      {2, 300, 500, 2, 64, 30, 150, 200, 0},
      // More global rows than a block owns (blocks of global rows, the last one partial), the first
      // global row not the shard's first (q_pos0, k_pos0 not multiples of the stride).
      {1, 1100, 1100, 2, 64, 40, 8, 0, 0},
      {2, 700, 900, 2, 32, 50, 9, 301, 100},
      {1, 333, 333, 3, 128, 17, 3, 0, 0},
      // Walks of the global rows longer than two segments (2 x 1024 rows): cut into segments
      // whose partial rows are combined, some segments empty; also with a shard and at head size
      // 128 (32-row backward tiles).
      {1, 2500, 2500, 2, 64, 64, 16, 0, 0},
      {1, 1500, 2600, 1, 32, 40, 7, 1100, 0},
      {1, 2200, 2200, 1, 128, 30, 50, 0, 0},
      // Queries after every key (the workspace memory's cross-attention), batch * heads above the
      // grid's 65535: run in batch pieces.
      {33000, 3, 5, 2, 16, 0, 0, 5, 0},
  };
  for (const Case& c : cases)
    for (DType t : kTypes) {
      const double scale = 1.0 / std::sqrt(double(c.dh));
      const AttentionPattern pat{c.window, c.stride};
      check_op(
          "sparse_attention",
          [&](const std::vector<Tensor>& in) {
            auto [o, lse] =
                sparse_attention_with_lse(in[0], in[1], in[2], pat, scale, c.q_pos0, c.k_pos0);
            return std::vector<Tensor>{o, lse};
          },
          {rnd({c.B, c.Lq, c.H, c.dh}, 62, 1.5), rnd({c.B, c.Lk, c.H, c.dh}, 63, 1.5),
           rnd({c.B, c.Lk, c.H, c.dh}, 64)},
          {true, true, true}, t);
    }
  // q, k, v as slices of one fused projection (tokens 3*H*dh apart, no copy).
  for (DType t : kTypes)
    check_op(
        "sparse_attention fused qkv",
        [](const std::vector<Tensor>& in) {
          auto qkv = split(in[0], {4, 4, 4}, 2);
          return std::vector<Tensor>{sparse_attention(qkv[0], qkv[1], qkv[2], {24, 16}, 0.25)};
        },
        {rnd({2, 67, 12, 16}, 65)}, {true}, t);
}

// Restores the determinism switch (train.deterministic) when the scope ends.
class ScopedDeterminism {
 public:
  ScopedDeterminism() : was_(hydra::deterministic()) {}
  ~ScopedDeterminism() { hydra::set_deterministic(was_); }
  ScopedDeterminism(const ScopedDeterminism&) = delete;
  ScopedDeterminism& operator=(const ScopedDeterminism&) = delete;

 private:
  bool was_;
};

// cuDNN's fused attention (kernels/cuda/attention_cudnn.cu) where it applies: bf16, dense causal
// or a sliding window over whole sequences (multiples of 128 tokens), head sizes 64 and 128, rows
// apart (a fused projection's slices), in deterministic mode and not. HYDRA_ATTENTION=cudnn makes
// a refused plan an error, and the count of cuDNN calls shows that it ran: forward and backward
// in every case. lse is compared without its gradient (cuDNN's backward takes none; with one the
// op runs ours).
TEST(CudaOps, CudnnAttentionMatchesCpu) {
  HYDRA_REQUIRE_GPU();
  if (!testing::cudnn_attention_available())
    GTEST_SKIP() << "the runtime's cuDNN is older than 9.10.2";
  const testing::ScopedEnv env("HYDRA_ATTENTION", "cudnn");
  const ScopedDeterminism restore;
  struct Case {
    int64_t B, L, H, dh, window;
    bool fused;  // q, k, v slices of one [B, L, 3, H, dh] projection
  };
  const std::vector<Case> cases = {{2, 256, 3, 64, 0, false},   {1, 384, 2, 128, 0, false},
                                   {2, 512, 2, 64, 100, false}, {1, 640, 3, 64, 512, true},
                                   {2, 256, 2, 64, 0, true},    {1, 256, 2, 128, 37, false}};
  for (const bool det : {false, true})
    for (const Case& c : cases) {
      SCOPED_TRACE("deterministic " + std::to_string(det) + " L " + std::to_string(c.L) +
                   " window " + std::to_string(c.window));
      hydra::set_deterministic(det);
      const double scale = 1.0 / std::sqrt(double(c.dh));
      const AttentionPattern pat{c.window, 0};
      const int64_t before = testing::cudnn_attention_calls();
      auto fn = [&](const std::vector<Tensor>& in) {
        Tensor q, k, v;  // the fused case has one input: in[1] and in[2] do not exist
        if (!c.fused) {
          q = in[0];
          k = in[1];
          v = in[2];
        } else {
          auto qkv = split(in[0], {c.H * c.dh, c.H * c.dh, c.H * c.dh}, 2);
          q = qkv[0].reshape({c.B, c.L, c.H, c.dh});  // views: rows 3 H dh apart
          k = qkv[1].reshape({c.B, c.L, c.H, c.dh});
          v = qkv[2].reshape({c.B, c.L, c.H, c.dh});
        }
        auto [o, lse] = sparse_attention_with_lse(q, k, v, pat, scale);
        return std::vector<Tensor>{o, lse.detach()};
      };
      const std::vector<Tensor> in =
          c.fused ? std::vector<Tensor>{rnd({c.B, c.L, 3 * c.H * c.dh}, 66, 1.5)}
                  : std::vector<Tensor>{rnd({c.B, c.L, c.H, c.dh}, 62, 1.5),
                                        rnd({c.B, c.L, c.H, c.dh}, 63, 1.5),
                                        rnd({c.B, c.L, c.H, c.dh}, 64)};
      check_op("cudnn attention", fn, in, std::vector<bool>(in.size(), true), DType::kBF16);
      EXPECT_EQ(testing::cudnn_attention_calls() - before, 2)
          << "cuDNN's forward and backward did not both run";
    }
  // Deterministic mode: a batch whose backward scratch would pass the cap runs fewer sequences a
  // call (at 4 x 8K with 8 heads, a whole batch's would be 3 GiB). The cap set to what one
  // sequence asks for makes four run split: more than one backward call, the same results.
  hydra::set_deterministic(true);
  {
    const int64_t one = testing::cudnn_attention_backward_workspace(1, 384, 2, 64);
    const int64_t cap = testing::cudnn_attention_set_max_workspace(one);
    const int64_t before = testing::cudnn_attention_calls();
    check_op(
        "cudnn attention, split batch",
        [](const std::vector<Tensor>& in) {
          auto [o, lse] = sparse_attention_with_lse(in[0], in[1], in[2], {0, 0}, 0.125);
          return std::vector<Tensor>{o, lse.detach()};
        },
        {rnd({4, 384, 2, 64}, 71, 1.5), rnd({4, 384, 2, 64}, 72, 1.5), rnd({4, 384, 2, 64}, 73)},
        {true, true, true}, DType::kBF16);
    testing::cudnn_attention_set_max_workspace(cap);
    EXPECT_GT(testing::cudnn_attention_calls() - before, 2)
        << "the backward ran whole although one sequence's scratch (" << one
        << " bytes) was the cap";
  }
  {  // a malformed cap is an error that names the variable (read when a plan is built: a new shape)
    const testing::ScopedEnv bad("HYDRA_CUDNN_WORKSPACE_MB", "12x");
    const Tensor x = rnd({1, 128, 1, 64}, 74).to(DType::kBF16).to(Device::cuda(0));
    try {
      (void)sparse_attention(x, x, x, {0, 0}, 0.125);
      ADD_FAILURE() << "HYDRA_CUDNN_WORKSPACE_MB=12x was accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("HYDRA_CUDNN_WORKSPACE_MB='12x'"), std::string::npos)
          << e.what();
    }
  }
  // Deterministic mode: the same gradients bit for bit, run to run.
  auto grads = [] {
    Tensor q = rnd({2, 512, 2, 64}, 67).to(DType::kBF16).to(Device::cuda(0));
    q.set_requires_grad(true);
    const Tensor k = rnd({2, 512, 2, 64}, 68).to(DType::kBF16).to(Device::cuda(0));
    const Tensor v = rnd({2, 512, 2, 64}, 69).to(DType::kBF16).to(Device::cuda(0));
    sparse_attention(q, k, v, {100, 0}, 0.125)
        .backward(rnd({2, 512, 2, 64}, 70).to(DType::kBF16).to(Device::cuda(0)));
    return q.grad().cpu();
  };
  EXPECT_TRUE(testing::bitwise_equal(grads(), grads()));
}

TEST(CudaOps, GatedUpdateMatchesCpu) {
  HYDRA_REQUIRE_GPU();
  for (const Shape& sh :
       {Shape{1, 1, 1}, Shape{2, 64, 384}, Shape{3, 37, 33}, Shape{1, 5, 2048}, Shape{4, 300, 40}})
    for (DType t : kTypes) {
      const int64_t n = sh.back();
      check_op(
          "gated_update",
          [](const std::vector<Tensor>& in) {
            auto [out, g] = gated_update(in[0], in[1], in[2], in[3]);
            return std::vector<Tensor>{out, g};
          },
          {rnd(sh, 80), rnd(sh, 81), rnd({1, 2 * n}, 82, 1.0 / std::sqrt(double(n))), rnd({1}, 83)},
          {true, true, true, true}, t);
    }
}

// Rows across the backward's blocks of 64, columns across its 256-column passes (257, 2048) and
// below one warp (1, 33), 1 to 4 paths, with and without the controller's mix.
TEST(CudaOps, GatedResidualMatchesCpu) {
  HYDRA_REQUIRE_GPU();
  struct Case {
    Shape shape;
    int paths;
    bool mix;
  };
  for (const Case& k :
       {Case{{1, 1, 1}, 1, false}, Case{{2, 64, 384}, 3, true}, Case{{3, 37, 33}, 2, true},
        Case{{1, 5, 2048}, 4, false}, Case{{1, 300, 257}, 3, true}})
    for (DType t : kTypes) {
      std::vector<Tensor> in = {rnd(k.shape, 90)};
      for (int i = 0; i < k.paths; ++i) in.push_back(rnd(k.shape, 91 + i));
      for (int i = 0; i < k.paths; ++i) in.push_back(rnd({k.shape.back()}, 95 + i));
      Shape ms = k.shape;
      ms.back() = k.paths;
      if (k.mix) in.push_back(rnd(ms, 99));
      const int paths = k.paths;
      const bool mix = k.mix;
      check_op(
          "gated_residual",
          [paths, mix](const std::vector<Tensor>& v) {
            const std::vector<Tensor> outs(v.begin() + 1, v.begin() + 1 + paths),
                gates(v.begin() + 1 + paths, v.begin() + 1 + 2 * paths);
            return std::vector<Tensor>{
                gated_residual(v[0], outs, gates, mix ? v.back() : Tensor())};
          },
          in, std::vector<bool>(in.size(), true), t);
    }
}

TEST(CudaOps, GatedScanMatchesCpu) {
  HYDRA_REQUIRE_GPU();
  struct Case {
    int64_t T, R, n;
  };
  for (const Case& c :
       std::vector<Case>{{1, 1, 1},
                         {0, 3, 5},
                         {7, 3, 37},
                         {33, 65, 384},
                         {5, 2, 2048},
                         {128, 9, 129},
                         {4, 1024, 24},
                         {3, 4, 500}})  // 1-4 columns a thread, wider; 1-16 row groups
    for (DType t : kTypes)
      check_op(
          "gated_scan",
          [](const std::vector<Tensor>& in) {
            auto [h, g] = gated_scan(in[0], in[1], in[2], in[3]);
            return std::vector<Tensor>{h, g};
          },
          {rnd({c.R, c.n}, 84), rnd({c.T, c.R, c.n}, 85),
           rnd({1, 2 * c.n}, 86, 1.0 / std::sqrt(double(c.n))), rnd({1}, 87)},
          {true, true, true, true}, t,
          // Each step rounds its state to bf16 (as T chained gated_update calls would), so the
          // gradients' error grows with T (1.02e-2 measured on the H200; 1e-2 for gated_update).
          t == DType::kBF16 ? 2.0 : 1.0);
}

// The routing kernels choose exactly what the CPU reference chooses: mask, counts, drops and the
// dispatch order, with ties in r (values on a coarse grid), chunks whose s is all zero, max_active
// from 1 to E, with and without a capacity, at odd sizes.
TEST(CudaOps, MoeRouteMatchesCpu) {
  HYDRA_REQUIRE_GPU();
  struct Case {
    int64_t batch, chunks, E, chunk_len, max_active, capacity;
  };
  for (const Case& c : std::vector<Case>{{1, 1, 1, 1, 1, 0},
                                         {2, 37, 8, 8, 2, 0},
                                         {3, 129, 8, 4, 2, 17},
                                         {4, 1024, 8, 8, 2, 0},
                                         {1, 2500, 5, 3, 5, 0},
                                         {2, 333, 64, 2, 4, 9},
                                         {5, 7, 3, 1, 3, 1}}) {
    const int64_t rows = c.batch * c.chunks;
    // r on a grid of 0.25 (many ties); s zero where r's draw is negative (about half).
    Tensor raw = rnd({rows, c.E}, 90 + c.chunks);
    const std::vector<float> v = raw.to_vector<float>();
    std::vector<float> rv(v.size()), sv(v.size());
    for (std::size_t i = 0; i < v.size(); ++i) {
      rv[i] = std::round(v[i] * 4) / 4;
      sv[i] = v[i] > 0 ? v[i] : 0;
    }
    const Tensor r = tensor(rv, {rows, c.E}), s = tensor(sv, {rows, c.E});
    const MoeDispatch cpu = moe_route(r, s, c.batch, c.chunk_len, c.max_active, c.capacity);
    const MoeDispatch gpu = moe_route(r.to(Device::cuda(0)), s.to(Device::cuda(0)), c.batch,
                                      c.chunk_len, c.max_active, c.capacity);
    const std::string at = "batch " + std::to_string(c.batch) + " chunks " +
                           std::to_string(c.chunks) + " E " + std::to_string(c.E) + " capacity " +
                           std::to_string(c.capacity);
    EXPECT_EQ(gpu.counts, cpu.counts) << at;
    EXPECT_EQ(gpu.dropped, cpu.dropped) << at;
    EXPECT_EQ(gpu.mask.cpu().to_vector<float>(), cpu.mask.to_vector<float>()) << at;
    EXPECT_EQ(gpu.perm.cpu().to_vector<int64_t>(), cpu.perm.to_vector<int64_t>()) << at;
    EXPECT_EQ(gpu.widx.cpu().to_vector<int64_t>(), cpu.widx.to_vector<int64_t>()) << at;
    EXPECT_EQ(gpu.inverse.cpu().to_vector<int64_t>(), cpu.inverse.to_vector<int64_t>()) << at;
    // The tiled order (tiles of 8 rows, and of 128: most of a group's last tile is padding).
    for (int64_t tile : {int64_t(8), int64_t(128)}) {
      const MoeDispatch tc = moe_route(r, s, c.batch, c.chunk_len, c.max_active, c.capacity, tile);
      const MoeDispatch tg = moe_route(r.to(Device::cuda(0)), s.to(Device::cuda(0)), c.batch,
                                       c.chunk_len, c.max_active, c.capacity, tile);
      const std::string tat = at + " tile " + std::to_string(tile);
      EXPECT_EQ(tg.host_counts->get(), tc.host_counts->get()) << tat;
      EXPECT_EQ(tg.perm.cpu().to_vector<int64_t>(), tc.perm.to_vector<int64_t>()) << tat;
      EXPECT_EQ(tg.widx.cpu().to_vector<int64_t>(), tc.widx.to_vector<int64_t>()) << tat;
      EXPECT_EQ(tg.inverse.cpu().to_vector<int64_t>(), tc.inverse.to_vector<int64_t>()) << tat;
      EXPECT_EQ(tg.tiles.cpu().to_vector<int64_t>(), tc.tiles.to_vector<int64_t>()) << tat;
    }
    int64_t kept = 0;
    for (int64_t k : cpu.counts) kept += k;
    EXPECT_GT(kept, 0) << at;
    if (c.capacity > 0 && c.chunks > 100) {
      int64_t dropped = 0;
      for (int64_t k : cpu.dropped) dropped += k;
      EXPECT_GT(dropped, 0) << at << ": the capacity should bind";
    }
  }
}

// Parts with lse -inf (no key) here and there, and one query that no part saw; lse compared through
// exp (a -inf output has no relative error).
TEST(CudaOps, MergeAttentionMatchesCpu) {
  HYDRA_REQUIRE_GPU();
  struct Case {
    int64_t P, B, L, H, dh;
  };
  for (const Case& c : std::vector<Case>{{1, 1, 1, 1, 1},
                                         {2, 2, 37, 3, 16},
                                         {3, 1, 65, 2, 64},
                                         {4, 2, 19, 1, 128},
                                         {5, 1, 33, 2, 24}})
    for (DType t : kTypes) {
      auto lse = rnd({c.P, c.B, c.H, c.L}, 70).to_vector<float>();
      for (std::size_t i = 0; i < lse.size(); i += 7) lse[i] = -INFINITY;
      for (int64_t i = 0; i < c.P; ++i)
        lse[i * c.B * c.H * c.L + c.L - 1] = -INFINITY;  // b 0, h 0, last query
      check_op(
          "merge_attention",
          [](const std::vector<Tensor>& in) {
            auto [o, l] = merge_attention(in[0], in[1]);
            return std::vector<Tensor>{o, exp(l)};
          },
          {rnd({c.P, c.B, c.L, c.H, c.dh}, 71), tensor(lse, {c.P, c.B, c.H, c.L})}, {true, true},
          t);
    }
}

TEST(CudaOps, SelectiveScanMatchesCpu) {
  HYDRA_REQUIRE_GPU();
  struct Case {
    int64_t B, L, D, N, chunk;
    bool full;  // z, D, dt_bias and h0 present
  };
  // Odd channel counts (a partial warp, two blocks), states below and at the template bounds (one
  // state per channel: the paper's form; 12: four of the bound's 16 unused),
  // chunks that do not divide the length, a length shorter than one chunk. The last case recomputes
  // 545 MB of states per batch entry, so the backward runs in two batch slices (its scratch is
  // capped at 1 GiB per launch), as at hydra-1.6b shapes.
  const std::vector<Case> cases = {{2, 37, 19, 5, 16, true},  {1, 50, 130, 16, 8, true},
                                   {3, 21, 64, 8, 64, false}, {2, 70, 33, 32, 32, true},
                                   {1, 9, 40, 64, 4, true},   {2, 45, 37, 1, 16, true},
                                   {2, 33, 45, 12, 16, true}, {2, 4096, 2048, 16, 64, true},
                                   {1, 600, 24, 16, 8, true}, {3, 777, 16, 8, 48, false}};
  // Both forms of the forward (HYDRA_SCAN_FWD): the chunked passes, and one pass with a warp's
  // lanes over time where it applies (4-byte accumulators, up to 16 states, chunks a multiple of 8
  // steps; elsewhere it falls back to the chunked form). The last two cases cross segments of 256
  // steps with partial ones at the end; the lanes form's chunk states reach the gradients.
  for (const char* form : {"chunked", "lanes"})
    for (const Case& c : cases)
      for (DType t : kTypes) {
        SCOPED_TRACE(std::string("HYDRA_SCAN_FWD=") + form);
        const testing::ScopedEnv env("HYDRA_SCAN_FWD", form);
        const int64_t lanes_before = testing::scan_lanes_calls();
        std::vector<Tensor> in = {rnd({c.B, c.L, c.D}, 70),        // u
                                  rnd({c.B, c.L, c.D}, 71, 0.7),   // delta_raw
                                  log(positive({c.D, c.N}, 72)),   // A_log
                                  rnd({c.B, c.L, c.N}, 73),        // B
                                  rnd({c.B, c.L, c.N}, 74),        // C
                                  rnd({c.D}, 75),                  // D
                                  rnd({c.D}, 76, 0.5),             // dt_bias
                                  rnd({c.B, c.L, c.D}, 77),        // z
                                  rnd({c.B, c.D, c.N}, 78, 0.5)};  // h0
        std::vector<bool> grad(in.size(), true);
        check_op(
            "selective_scan",
            [&](const std::vector<Tensor>& x) {
              const Tensor h0 = c.full ? x[8].to(accumulate_dtype(x[0].dtype())) : Tensor();
              const SelectiveScanResult r =
                  selective_scan(x[0], x[1], x[2], x[3], x[4], c.full ? x[5] : Tensor(),
                                 c.full ? x[6] : Tensor(), c.full ? x[7] : Tensor(), h0, c.chunk);
              return std::vector<Tensor>{r.y, r.h_last};
            },
            c.full ? in : std::vector<Tensor>(in.begin(), in.begin() + 5),
            c.full ? grad : std::vector<bool>(5, true), t);
        // The form asked for ran where it applies (up to 16 states, chunks of a multiple of 8).
        const bool lanes = std::string(form) == "lanes" && c.N <= 16 && c.chunk % 8 == 0;
        EXPECT_EQ(testing::scan_lanes_calls() > lanes_before, lanes);
      }
  // The model's layout: u and z halves of one projection's rows, B and C parts of another's (the
  // kernels read them in place). Aligned rows: the inputs arrive by asynchronous 16-byte copies;
  // B and C at column 3: those by plain loads.
  for (const char* form : {"chunked", "lanes"})
    for (const int64_t bc_col : {24, 3})
      for (DType t : kTypes) {
        SCOPED_TRACE(std::string("HYDRA_SCAN_FWD=") + form);
        const testing::ScopedEnv env("HYDRA_SCAN_FWD", form);
        const int64_t B = 2, L = 150, D = 256, N = 16;
        check_op(
            "selective_scan rows apart, B at column " + std::to_string(bc_col),
            [&](const std::vector<Tensor>& x) {
              const SelectiveScanResult r = selective_scan(
                  x[0].narrow(2, 0, D), x[1], x[2], x[3].narrow(2, bc_col, N),
                  x[3].narrow(2, bc_col + N, N), x[4], x[5], x[0].narrow(2, D, D), Tensor(), 64);
              return std::vector<Tensor>{r.y};
            },
            {rnd({B, L, 2 * D}, 90), rnd({B, L, D}, 91, 0.7), log(positive({D, N}, 92)),
             rnd({B, L, bc_col + 2 * N + 5}, 93), rnd({D}, 94), rnd({D}, 95, 0.5)},
            std::vector<bool>(6, true), t);
      }
}

TEST(CudaOps, SsdScanMatchesCpu) {
  HYDRA_REQUIRE_GPU();
  struct Case {
    int64_t B, L, H, P, N, chunk;
    bool full;  // z, D, dt_bias and h0 present
  };
  // Odd head widths and state counts, chunks that do not divide the length (a padded last chunk),
  // a length shorter than one chunk, and the toy's head shape over several chunks.
  const std::vector<Case> cases = {{2, 37, 3, 5, 7, 16, true},
                                   {1, 50, 2, 13, 16, 8, true},
                                   {3, 21, 4, 3, 8, 64, false},
                                   {2, 300, 2, 64, 16, 64, true}};
  for (const Case& c : cases)
    for (DType t : kTypes) {
      const int64_t D = c.H * c.P;
      std::vector<Tensor> in = {rnd({c.B, c.L, D}, 80),         // u
                                rnd({c.B, c.L, c.H}, 81, 0.7),  // delta_raw
                                log(positive({c.H}, 82)),       // A_log
                                rnd({c.B, c.L, c.N}, 83),       // B
                                rnd({c.B, c.L, c.N}, 84),       // C
                                rnd({D}, 85),                   // D
                                rnd({c.H}, 86, 0.5),            // dt_bias
                                rnd({c.B, c.L, D}, 87),         // z
                                rnd({c.B, D, c.N}, 88, 0.5)};   // h0
      std::vector<bool> grad(in.size(), true);
      check_op(
          "ssd_scan",
          [&](const std::vector<Tensor>& x) {
            const Tensor h0 = c.full ? x[8].to(accumulate_dtype(x[0].dtype())) : Tensor();
            const SelectiveScanResult r =
                ssd_scan(x[0], x[1], x[2], x[3], x[4], c.full ? x[5] : Tensor(),
                         c.full ? x[6] : Tensor(), c.full ? x[7] : Tensor(), h0, c.chunk);
            return std::vector<Tensor>{r.y, r.h_last};
          },
          c.full ? in : std::vector<Tensor>(in.begin(), in.begin() + 5),
          c.full ? grad : std::vector<bool>(5, true), t,
          // f32: the chunk products run as three TF32 products (each about 2^-21 relative,
          // against f32's 2^-24), and dt_bias's gradient sums every step's with cancellation
          t == DType::kF32 ? 4.0 : 1.0);
    }
}

TEST(CudaOps, AdamWMatchesCpu) {
  HYDRA_REQUIRE_GPU();
  const Tensor p = rnd({1031}, 51), g = rnd({1031}, 52), m = rnd({1031}, 53, 0.1),
               v = exp(rnd({1031}, 54));
  const AdamWHyper h = adamw_hyper(1e-3, 0.9, 0.95, 1e-8, 0.1, 3, 0.5);
  Tensor cp = p.clone(), cm = m.clone(), cv = v.clone();
  Tensor gp = p.to(Device::cuda(0)), gm = m.to(Device::cuda(0)), gv = v.to(Device::cuda(0));
  adamw_update(cp, g, cm, cv, h);
  adamw_update(gp, g.to(Device::cuda(0)), gm, gv, h);
  EXPECT_LT(testing::rel_error(gp.cpu(), cp), 1e-6);
  EXPECT_LT(testing::rel_error(gm.cpu(), cm), 1e-6);
  EXPECT_LT(testing::rel_error(gv.cpu(), cv), 1e-6);
  // Row-sparse.
  const Tensor table = rnd({40, 8}, 55), tm = zeros({40, 8}), tv = zeros({40, 8});
  const Tensor rows_idx = tensor<int64_t>({3, 17, 39}, {3}), vals = rnd({3, 8}, 56);
  Tensor ct = table.clone(), ctm = tm.clone(), ctv = tv.clone();
  Tensor gt = table.to(Device::cuda(0)), gtm = tm.to(Device::cuda(0)), gtv = tv.to(Device::cuda(0));
  adamw_update_rows(ct, rows_idx, vals, ctm, ctv, h);
  adamw_update_rows(gt, rows_idx.to(Device::cuda(0)), vals.to(Device::cuda(0)), gtm, gtv, h);
  EXPECT_LT(testing::rel_error(gt.cpu(), ct), 1e-6);
}

// Clipping on the device (AdamWHyper::sum_squares): on the GPU the same update as with the factor
// the host computes from the same sum, bit for bit, in the dense, fused and row kernels; a
// non-finite sum leaves everything as it was; the rows marked hit equal the listed rows' update.
TEST(CudaOps, AdamWClipsOnTheDeviceAsTheHostWould) {
  HYDRA_REQUIRE_GPU();
  const Device gpu = Device::cuda(0);
  const std::vector<Tensor> grads = {rnd({1031}, 61), rnd({77, 5}, 62)};
  const std::vector<Tensor> on_gpu = {grads[0].to(gpu), grads[1].to(gpu)};
  const Tensor ss = sum_squares_all_on(on_gpu, gpu);
  const double host_ss = sum_squares_all(on_gpu);
  EXPECT_EQ(ss.cpu().to_vector<double>()[0], host_ss) << "the same order, the same sum";
  const Tensor p = rnd({1031}, 63), m = rnd({1031}, 64, 0.1), v = exp(rnd({1031}, 65));
  const Tensor table = rnd({40, 8}, 66), tm = rnd({40, 8}, 67, 0.1), tv = exp(rnd({40, 8}, 68));
  const Tensor rows_idx = tensor<int64_t>({3, 17, 39}, {3}), vals = rnd({3, 8}, 69);
  std::vector<int32_t> hit(40, 0);
  Tensor dense_vals = zeros({40, 8});
  for (int64_t r : {3, 17, 39}) hit[r] = 1;
  dense_vals.narrow(0, 3, 1).copy_(vals.narrow(0, 0, 1));
  dense_vals.narrow(0, 17, 1).copy_(vals.narrow(0, 1, 1));
  dense_vals.narrow(0, 39, 1).copy_(vals.narrow(0, 2, 1));
  const Tensor hits = tensor<int32_t>(hit, {40});
  for (const double clip : {0.0, 1.0, 1e9, -1.0}) {  // -1: a non-finite sum
    const Tensor sum = clip < 0 ? tensor<double>({NAN}, {1}).to(gpu) : ss;
    AdamWHyper host = adamw_hyper(1e-3, 0.9, 0.95, 1e-8, 0.1, 3, 1.0);
    const double norm = std::sqrt(host_ss);
    host.grad_scale = clip > 0 && norm > clip ? clip / (norm + 1e-6) : 1.0;
    AdamWHyper dev = host;
    dev.grad_scale = 123;  // unused
    dev.sum_squares = sum;
    dev.clip = clip < 0 ? 0 : clip;
    const auto run = [&](const AdamWHyper& h, bool hit_rows) {
      std::vector<Tensor> out = {p.to(gpu),  m.to(gpu), v.to(gpu), table.to(gpu), tm.to(gpu),
                                 tv.to(gpu), p.to(gpu), m.to(gpu), v.to(gpu)};
      adamw_update(out[0], grads[0].to(gpu), out[1], out[2], h);
      if (hit_rows) {
        adamw_update_hit_rows(out[3], hits.to(gpu), dense_vals.to(gpu), out[4], out[5], h);
      } else {
        adamw_update_rows(out[3], rows_idx.to(gpu), vals.to(gpu), out[4], out[5], h);
      }
      adamw_update_many({{out[6], grads[0].to(gpu), out[7], out[8], 2e-3, 0.0}}, h);
      std::vector<std::vector<float>> host_out;
      host_out.reserve(out.size());
      for (const Tensor& t : out) host_out.push_back(t.cpu().to_vector<float>());
      return host_out;
    };
    const auto want = run(host, false);
    const auto got = run(dev, false), got_hits = run(dev, true);
    for (std::size_t i = 0; i < want.size(); ++i) {
      if (clip < 0) {  // nothing moved
        const Tensor orig = std::vector<Tensor>{p, m, v, table, tm, tv, p, m, v}[i];
        EXPECT_EQ(got[i], orig.to_vector<float>()) << "non-finite: tensor " << i;
        EXPECT_EQ(got_hits[i], orig.to_vector<float>()) << "non-finite: tensor " << i;
        continue;
      }
      EXPECT_EQ(got[i], want[i]) << "clip " << clip << ", tensor " << i;
      EXPECT_EQ(got_hits[i], want[i]) << "clip " << clip << ", tensor " << i << " (hit rows)";
    }
  }
}

TEST(CudaOps, FusedAdamWOverManyTensorsMatchesCpu) {
  HYDRA_REQUIRE_GPU();
  // More tensors than one launch takes (160), odd sizes, per-tensor lr and decay, f32 and bf16.
  for (DType dt : {DType::kF32, DType::kBF16}) {
    std::vector<AdamWEntry> cpu, gpu;
    for (int i = 0; i < 170; ++i) {
      const int64_t n = 1 + (i * 7919) % 20011;
      AdamWEntry c{rnd({n}, 100 + i).to(dt).to(DType::kF32),
                   rnd({n}, 400 + i).to(dt).to(DType::kF32),
                   rnd({n}, 700 + i, 0.1).to(dt).to(DType::kF32),
                   exp(rnd({n}, 900 + i)).to(dt).to(DType::kF32),
                   1e-3 * (1 + i % 3),
                   i % 2 ? 0.1 : 0.0};
      AdamWEntry g{c.param.to(dt).to(Device::cuda(0)),
                   c.grad.to(dt).to(Device::cuda(0)),
                   c.m.to(dt).to(Device::cuda(0)),
                   c.v.to(dt).to(Device::cuda(0)),
                   c.lr,
                   c.weight_decay};
      cpu.push_back(c);
      gpu.push_back(g);
    }
    AdamWHyper h;
    h.beta1 = 0.9;
    h.beta2 = 0.95;
    h.step = 7;
    h.grad_scale = 0.25;
    adamw_update_many(cpu, h);
    adamw_update_many(gpu, h);
    for (std::size_t i = 0; i < cpu.size(); ++i) {
      EXPECT_LT(testing::rel_error(gpu[i].param.to(DType::kF32).cpu(), cpu[i].param), tolerance(dt))
          << i;
      EXPECT_LT(testing::rel_error(gpu[i].m.to(DType::kF32).cpu(), cpu[i].m), tolerance(dt)) << i;
      EXPECT_LT(testing::rel_error(gpu[i].v.to(DType::kF32).cpu(), cpu[i].v), tolerance(dt)) << i;
    }
  }
}

TEST(CudaOps, GlobalSumOfSquaresMatchesCpu) {
  HYDRA_REQUIRE_GPU();
  std::vector<Tensor> cpu, gpu;
  for (int i = 0; i < 300; ++i) {
    cpu.push_back(rnd({1 + (i * 104729) % 70001}, 2000 + i));
    gpu.push_back(cpu.back().to(Device::cuda(0)));
  }
  const double a = sum_squares_all(cpu), b = sum_squares_all(gpu);
  EXPECT_LT(std::abs(a - b) / a, 1e-6);
  EXPECT_EQ(b, sum_squares_all(gpu));  // bit-reproducible
}

TEST(CudaOps, EmbeddingBackwardIsDeterministic) {
  HYDRA_REQUIRE_GPU();
  hydra::set_deterministic(true);
  Generator g(57);
  const Tensor idx = randint(0, 64, {20000}, g).to(Device::cuda(0));  // many repeats per row
  auto grad_once = [&] {
    Tensor w = rnd({64, 512}, 58).to(Device::cuda(0));
    w.set_requires_grad(true);
    Tensor y = embedding(w, idx);
    y.backward(rnd({20000, 512}, 59).to(Device::cuda(0)));
    return w.grad().cpu();
  };
  const Tensor a = grad_once(), b = grad_once();
  EXPECT_TRUE(testing::bitwise_equal(a, b));
}

}  // namespace
}  // namespace hydra
