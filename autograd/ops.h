// The differentiable op set. Every op runs on the CPU (reference) and, where its kernel family has
// one, on CUDA; inputs must share a device and (floating ones) a dtype. Shape errors name the op
// and the shapes. Each op's backward is written by hand next to its forward (autograd/ops_*.cpp).
//
// Naming: an op that has kernels of its own gives its name to all of them. The kernel family's
// header is kernels/<op>.h with kernels/cpu/<op>.cpp and kernels/cuda/<op>*.cu, its kernels are
// <op>_fwd and <op>_bwd (their Params <Op>Params, <Op>BwdParams), its tests <Op>.* (CPU and
// gradient checks, tests/autograd) and CudaOps.<Op>MatchesCpu (tests/gpu), its benchmark rows
// start with the op's name. Families that serve many ops are named for what they compute (gemm,
// elementwise, copy, reduce, index, attention, pkm). Where each op runs:
//
//   op                      kernel family (kernels/)      gradient test             benchmark row
//   add sub mul div ...     elementwise: binary           Binary.Gradcheck*         mul [..]
//   exp log relu silu ...   elementwise: unary_fwd/bwd    Unary.GradcheckFloat64    silu [..]
//   sum mean amax sum_to    reduce: reduce_axis           Sum., Mean.Gradcheck*     sum over rows
//   matmul linear           matmul: gemm                  Matmul., Linear.*         <model> in_proj
//   grouped_linear          matmul: grouped_gemm          GroupedLinear.*           8 experts up
//   tiled_linear            matmul: tile_gemm             TiledLinear.*             (the MoE step)
//   rms_norm                rms_norm                      RmsNorm.GradcheckFloat64  rms_norm fwd
//   rms_norm_multi          rms_norm: rms_norm_multi_*    RmsNorm.Multi*            (the block)
//   gated_residual          gated_residual                GatedResidual.*           gated_residual
//   softmax log_softmax     softmax                       Softmax., LogSoftmax.*    softmax fwd
//   cross_entropy           loss: cross_entropy_*         CrossEntropy.*            cross_entropy
//   embedding gather_rows   index: gather_rows            Embedding., GatherRows.*  embedding fwd
//   scatter_add_rows        index: scatter_add_rows       ScatterAddRows.* scatter_add_rows
//   gather_sum_rows         index: gather_sum_rows        GatherSumRows.*           (the MoE step)
//   gather scatter_add      index: axis_gather, axis_scatter_add  Gather., ScatterAdd.*  -
//   embedding_bag           pkm: embedding_bag_fwd/bwd    EmbeddingBag.*            (the PKM step)
//   product_key_indices     pkm: product_key_indices      (no gradient)             -
//   topk                    topk                          Topk.GradcheckFloat64     -
//   sparse_attention        attention: attention_fwd/bwd  SparseAttention.*         <model>
//   attention merge_attention         merge_attention               MergeAttention.*          -
//   rope                    rope                          Rope.GradcheckFloat64     -
//   causal_conv1d           conv1d: causal_conv1d_*       CausalConv1d.*            conv1d fwd
//   selective_scan          selective_scan                SelectiveScan.*           selective_scan
//   ssd_scan                ssd_scan: ssd_scan_fwd/bwd    SsdScan.*                 ssd_scan
//   gated_update gated_scan gated_update                  GatedUpdate., GatedScan.* -
//   moe_route               moe_route                     (no gradient)             -
//   moe_aux                 moe_aux: moe_aux_fwd/bwd      MoeAux.GradcheckFloat64   -
//   moe_combine             moe_combine: moe_combine_*    MoeCombine.*              (the MoE step)
//   concat split views      copy: strided_copy            Concat., Split., Views.*  copy of a slice
//
// (Benchmark rows: bench/hydra_bench_gpu.cpp, "toy32k ..." and model-shaped rows; the CPU's in
// bench/hydra_bench.cpp. The optimizer's kernels, adamw_* in kernels/optim.h, have no op.)
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include "autograd/random.h"
#include "autograd/tensor.h"

namespace hydra {

// ---- creation
// --------------------------------------------------------------------------------------
Tensor empty(const Shape& shape, DType dtype = DType::kF32, Device device = Device::cpu());
Tensor zeros(const Shape& shape, DType dtype = DType::kF32, Device device = Device::cpu());
Tensor ones(const Shape& shape, DType dtype = DType::kF32, Device device = Device::cpu());
Tensor full(const Shape& shape, double value, DType dtype = DType::kF32,
            Device device = Device::cpu());
Tensor arange(int64_t n, DType dtype = DType::kI64, Device device = Device::cpu());
Tensor empty_like(const Tensor& t);
Tensor zeros_like(const Tensor& t);
Tensor ones_like(const Tensor& t);
// Random tensors draw from `gen` (advancing it), or from the default generator.
Tensor rand(const Shape& shape, Generator& gen, double low = 0, double high = 1,
            DType dtype = DType::kF32, Device device = Device::cpu());
Tensor randn(const Shape& shape, Generator& gen, double mean = 0, double stddev = 1,
             DType dtype = DType::kF32, Device device = Device::cpu());
Tensor randint(int64_t low, int64_t high, const Shape& shape, Generator& gen,
               DType dtype = DType::kI64, Device device = Device::cpu());
void normal_(Tensor& t, Generator& gen, double mean, double stddev);  // in place, no autograd
void uniform_(Tensor& t, Generator& gen, double low, double high);    // in place, no autograd

// ---- elementwise
// -----------------------------------------------------------------------------------
Tensor add(const Tensor& a, const Tensor& b);  // broadcasting
Tensor sub(const Tensor& a, const Tensor& b);
Tensor mul(const Tensor& a, const Tensor& b);
Tensor div(const Tensor& a, const Tensor& b);
Tensor add(const Tensor& a, double b);
Tensor mul(const Tensor& a, double b);
Tensor affine(const Tensor& x, double alpha, double beta);  // alpha * x + beta
Tensor neg(const Tensor& x);
Tensor exp(const Tensor& x);
Tensor log(const Tensor& x);
Tensor sigmoid(const Tensor& x);
Tensor silu(const Tensor& x);
Tensor softplus(const Tensor& x);
Tensor gelu(const Tensor& x);  // exact (erf) form
Tensor relu(const Tensor& x);
Tensor sqrt(const Tensor& x);
Tensor rsqrt(const Tensor& x);
Tensor square(const Tensor& x);
Tensor tanh(const Tensor& x);
Tensor pow(const Tensor& x, double exponent);

inline Tensor operator+(const Tensor& a, const Tensor& b) { return add(a, b); }
inline Tensor operator-(const Tensor& a, const Tensor& b) { return sub(a, b); }
inline Tensor operator*(const Tensor& a, const Tensor& b) { return mul(a, b); }
inline Tensor operator/(const Tensor& a, const Tensor& b) { return div(a, b); }
inline Tensor operator+(const Tensor& a, double b) { return add(a, b); }
inline Tensor operator-(const Tensor& a, double b) { return add(a, -b); }
inline Tensor operator*(const Tensor& a, double b) { return mul(a, b); }
inline Tensor operator*(double a, const Tensor& b) { return mul(b, a); }
inline Tensor operator/(const Tensor& a, double b) { return mul(a, 1.0 / b); }
inline Tensor operator-(const Tensor& a) { return neg(a); }

// The broadcast shape of a and b, or an error naming `op` and both shapes.
Shape broadcast_shapes(const Shape& a, const Shape& b, const char* op);

// ---- reductions
// ------------------------------------------------------------------------------------ Over `axes`
// (all axes when empty); negative axes count from the end.
Tensor sum(const Tensor& x, const std::vector<int64_t>& axes = {}, bool keepdim = false);
Tensor mean(const Tensor& x, const std::vector<int64_t>& axes = {}, bool keepdim = false);
// Sums a broadcast gradient back to `shape` (the backward of broadcasting).
Tensor sum_to(const Tensor& x, const Shape& shape);
// Not differentiable: statistics.
Tensor amax(const Tensor& x, int64_t axis, bool keepdim = false);
Tensor sum_squares(const Tensor& x);  // sum of x^2 over all elements, as a 1-element tensor
// sum over tensors of sum of x^2, in double: one fused launch per device, dtype and 128 tensors,
// one host synchronisation per launch. Fixed summation order (bit-reproducible).
double sum_squares_all(const std::vector<Tensor>& xs);
// The same sum (same order, same value) as an f64 [1] tensor on `device`, where every x must be;
// nothing waits for the device.
Tensor sum_squares_all_on(const std::vector<Tensor>& xs, Device device);

// ---- linear algebra
// -------------------------------------------------------------------------------- a [..., M, K] @
// b [K, N] -> [..., M, N];  a [B..., M, K] @ b [B..., K, N] -> [B..., M, N]. Transposed views are
// passed to BLAS as transposes, without copies.
Tensor matmul(const Tensor& a, const Tensor& b);
// x [..., in] -> x @ w^T + bias, w [out, in], bias [out] or undefined.
Tensor linear(const Tensor& x, const Tensor& w, const Tensor& bias = Tensor());

// ---- normalisation, softmax, losses
// ----------------------------------------------------------------
Tensor rms_norm(const Tensor& x, const Tensor& weight,
                double eps = 1e-6);  // over the last axis; weight may be undefined
// rms_norm(x, weights[k], eps) for each of 1 to 4 weights, in one kernel each way
// (kernels/rms_norm.h: the backward sums the norms' input gradients itself). The outputs equal the
// single norms' on the CPU; on CUDA, shapes its kernels do not take run as single norms.
std::vector<Tensor> rms_norm_multi(const Tensor& x, const std::vector<Tensor>& weights,
                                   double eps = 1e-6);
// A residual plus gated paths (a Hydra block's combine): x and each of outs [..., d], each gate
// [d], mix undefined or [..., outs.size()]: y = x + sum_i outs[i] * gates[i] * mix[..., i] (mix 1
// when undefined). Up to 4 paths; one kernel each way (kernels/gated_residual.h).
Tensor gated_residual(const Tensor& x, const std::vector<Tensor>& outs,
                      const std::vector<Tensor>& gates, const Tensor& mix = Tensor());
// BlockFFN's auxiliary losses of one MoE layer (balance, locality, sparsity), fused: raw, s, r
// [batch, chunks, experts] (the router's logits, their ReLU and its RMSNorm), load [experts] (no
// gradient), z_next [batch, experts] or undefined (no gradient). Returns [2, 3]: row 0 the losses
// times o.weights, row 1 the losses. The mathematics: kernels/moe_aux.h; three kernels each way.
struct MoeAuxOptions {
  int64_t chunk_len = 1, group = 1;
  double alpha = 1, balance_scale = 0, locality_scale = 0, sparsity_scale = 0;
  double weights[3] = {1, 1, 1};
};
Tensor moe_aux(const Tensor& raw, const Tensor& s, const Tensor& r, const Tensor& load,
               const Tensor& z_next, const MoeAuxOptions& o);
// A gated update of rows: s, u [..., n]; w [1, 2n] (or [2n]: the gate's weights for s, then u); b
// [1]. out = s + g (u - s) with g = sigmoid(<s, w_s> + <u, w_u> + b) per row. Returns {out, g [...,
// 1]} (g is not differentiable). One kernel each way (kernels/gated_update.h).
std::pair<Tensor, Tensor> gated_update(const Tensor& s, const Tensor& u, const Tensor& w,
                                       const Tensor& b);
// gated_update applied T times in a row: s [R, n] is h_0, u [T, R, n] the updates, and
// h_{t+1} = gated_update(h_t, u_t). Returns {h [T + 1, R, n] (every state, h_0 included), g [T, R]}
// (g is not differentiable). One fused kernel each way: the steps run inside it
// (kernels/gated_update.h).
std::pair<Tensor, Tensor> gated_scan(const Tensor& s, const Tensor& u, const Tensor& w,
                                     const Tensor& b);
Tensor softmax(const Tensor& x);      // over the last axis
Tensor log_softmax(const Tensor& x);  // over the last axis
enum class Reduction { kMean, kSum, kNone };
// logits [..., V], targets [...] (i32/i64). kMean averages over the rows whose target !=
// ignore_index.
Tensor cross_entropy(const Tensor& logits, const Tensor& targets, int64_t ignore_index = -100,
                     Reduction reduction = Reduction::kMean);

// ---- indexing
// -------------------------------------------------------------------------------------- weight [V,
// d], indices [...] (i32/i64) -> [..., d]; backward scatter-adds rows (deterministic).
Tensor embedding(const Tensor& weight, const Tensor& indices);
// Rows of a 2-D table: out[i] = table[index[i]]  (index_select on axis 0).
Tensor gather_rows(const Tensor& table, const Tensor& index);
// The same when the index's inverse is known: inverse [R, K] (i64) lists, for each table row r,
// the positions i with index[i] = r in ascending order, padded with -1. The backward sums those
// rows (gather_sum_rows) instead of scatter-adding: no sort, deterministic.
Tensor gather_rows(const Tensor& table, const Tensor& index, const Tensor& inverse);
// out = table with src[i] added to row index[i]  (index_add on axis 0).
Tensor scatter_add_rows(const Tensor& table, const Tensor& index, const Tensor& src);
// The scatter-add into zeros by its inverse: out [R, C] with out[r] = the sum of src[inverse[r, k]]
// over the k with inverse[r, k] >= 0, in k order. `index` [n] (index[i] = the row that names i)
// serves the backward, a gather. For an injective index this equals
// scatter_add_rows(zeros({R, C}), index, src).
Tensor gather_sum_rows(const Tensor& src, const Tensor& inverse, const Tensor& index);
// The MoE's weighted combine (kernels/moe_combine.h): out [tokens, C] with out[t] = the sum over
// k of w[widx[i]] * y[i], i = inverse[t, k] >= 0; w [pairs] (pairs = chunks * experts), a widx
// past the pairs weighing 0 (padding). perm [rows] (each dispatch row's token) serves the
// backward. The dispatch must route chunks (each chunk's chunk_len tokens share their pairs, as
// moe_route does): gw sums a pair's rows by its chunk. Equals gather_sum_rows(mul(y,
// gather_rows(w with a 0 appended, widx)), inverse, perm) without the weights' sort-and-scatter
// backward.
Tensor moe_combine(const Tensor& y, const Tensor& w, const Tensor& inverse, const Tensor& widx,
                   const Tensor& perm, int64_t experts, int64_t chunk_len);
// In place, outside autograd: table[index[i]] += src[i] (table contiguous, e.g. a parameter).
void scatter_add_rows_(const Tensor& table, const Tensor& index, const Tensor& src);
// Along `axis`: out[.., i, ..] = x[.., index[.., i, ..], ..]; index has x's shape except along
// axis.
Tensor gather(const Tensor& x, int64_t axis, const Tensor& index);
// out = x; out[.., index[.., i, ..], ..] += src[.., i, ..]; index has src's shape.
Tensor scatter_add(const Tensor& x, int64_t axis, const Tensor& index, const Tensor& src);
Tensor concat(const std::vector<Tensor>& tensors, int64_t axis);
// Views of consecutive pieces of `sizes` along `axis` (one node: its backward concatenates).
std::vector<Tensor> split(const Tensor& x, const std::vector<int64_t>& sizes, int64_t axis);
// The k largest along the last axis, descending, ties to the lower index; gradient flows to values.
std::pair<Tensor, Tensor> topk(const Tensor& x, int64_t k);

// Product-key indices (PKM): a, b [..., k] (i64, the top-k keys of each half), pick [..., count]
// (i64, cells c of their k x k grid) -> [..., count] with a[.., c / k] * n_keys + b[.., c % k]. No
// gradient. With `cells` (i64 [P], cells of the grid), pick names places in cells instead.
Tensor product_key_indices(const Tensor& a, const Tensor& b, const Tensor& pick, int64_t n_keys,
                           const Tensor& cells = Tensor());

// Weighted bags of rows: out[t] = sum_k weights[t, k] * table[index[t, k]]; table [R, C], index and
// weights [n, m] -> [n, C]. With sparse_grad the table (a leaf) receives its gradient as row-sparse
// Tensor::sparse_grad() instead of a dense tensor (PKM values: few rows of a large table per step).
Tensor embedding_bag(const Tensor& table, const Tensor& index, const Tensor& weights,
                     bool sparse_grad = false);
// Adds rows/values to a leaf's row-sparse gradient (rows of equal index summed), then runs its
// gradient-ready hooks.
void accumulate_sparse_grad(const Tensor& leaf, const Tensor& rows, const Tensor& values);
// The sparse gradient as a dense tensor of the leaf's shape (zeros where no row was touched).
Tensor densify_sparse_grad(const Tensor& leaf);

// ---- experts ------------------------------------------------------------------------------------
// Grouped linear (the experts' GEMMs): x [n, in] holds consecutive row groups of group_sizes (sum
// n); group s is multiplied by w[s % G]^T with w [G, out, in] (so G groups are one per expert, and
// P * G groups are P blocks of G, as rows arrive from P peers). Returns [n, out].
Tensor grouped_linear(const Tensor& x, const Tensor& w, const std::vector<int64_t>& group_sizes);
// The experts' layers on the tiled dispatch order (kernels/moe_route.h), whose group sizes stay on
// the device: x [tiles * tile, in] -> [tiles * tile, out], tile t's rows by w[tiles[t]] ([G, out,
// in]; a tile past the last group uses w[0]: its rows are padding). Forward and input gradient need
// no group size on the host; the weight gradient reads `sizes` (each group's rows before padding,
// in group order) in the backward, when their copy to the host has long finished.
struct TiledGroups {
  int64_t tile = 0;
  Tensor tiles;                                 // [tiles] i64 on x's device
  std::function<std::vector<int64_t>()> sizes;  // rows per group, for the weight gradient
};
Tensor tiled_linear(const Tensor& x, const Tensor& w, const TiledGroups& groups);
// The chunk routing of the experts (kernels/moe_route.h), on the tensors' device: r, s [rows, E]
// with rows = batch * chunks. Not differentiable. Only `counts` and `dropped` come to the host (2E
// integers: the grouped GEMMs need the group sizes there); the dispatch order stays on the device.
// With tile > 0 the dispatch order is tiled (kernels/moe_route.h) and nothing waits for the host:
// perm and widx hold every slot of the tiled order, `tiles` names each tile's expert, and the
// counts travel to the host behind the queued work (`host_counts`: counts, then dropped).
struct MoeDispatch {
  Tensor mask;        // [rows, E] in r's dtype: 1 where the chunk's tokens go to the expert
  Tensor perm, widx;  // [sum(counts) * chunk_len] i64 (kernels/moe_route.h); tiled: every slot
  Tensor inverse;     // [batch * chunks * chunk_len, min(max_active, E)] i64: perm's inverse
  std::vector<int64_t> counts;   // [E] kept chunks per expert (packed order only)
  std::vector<int64_t> dropped;  // [E] chunks dropped by the capacity (packed order only)
  Tensor device_counts;          // [2, E] i64: counts, then dropped, on the device
  Tensor tiles;                  // tiled: [tiles] i64, each tile's expert (-1: past the last)
  std::shared_ptr<PendingHostCopy> host_counts;  // tiled: device_counts on their way to the host
};
MoeDispatch moe_route(const Tensor& r, const Tensor& s, int64_t batch, int64_t chunk_len,
                      int64_t max_active, int64_t capacity, int64_t tile = 0);

// ---- attention ----------------------------------------------------------------------------------
// The sparse causal pattern of kernels/attention.h. window <= 0: unlimited; global_stride 0: none.
// Dense causal attention is {0, 0}.
struct AttentionPattern {
  int64_t window = 0;
  int64_t global_stride = 0;
};
// q [B, Lq, H, dh], k and v [B, Lk, H, dh] -> [B, Lq, H, dh]; query i sits at position q_pos0 + i
// and key j at k_pos0 + j. Tiled (flash-style): memory is linear in L.
Tensor sparse_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                        const AttentionPattern& pattern, double scale, int64_t q_pos0 = 0,
                        int64_t k_pos0 = 0);
// The same, also returning the log-sum-exp [B, H, Lq] (for merging partial attentions).
std::pair<Tensor, Tensor> sparse_attention_with_lse(const Tensor& q, const Tensor& k,
                                                    const Tensor& v,
                                                    const AttentionPattern& pattern, double scale,
                                                    int64_t q_pos0 = 0, int64_t k_pos0 = 0);
// Partial attentions of the same queries over disjoint key sets, merged with the log-sum-exp rule:
// outs [P, B, L, H, dh], lses [P, B, H, L] (accumulate dtype; -inf: the part saw no key) ->
// {o [B, L, H, dh], lse [B, H, L]} with lse = log sum_i exp(lse_i), o = sum_i exp(lse_i - lse) o_i.
// Differentiable in outs and lses. To drop a part for some queries, set its lse there to -inf.
std::pair<Tensor, Tensor> merge_attention(const Tensor& outs, const Tensor& lses);
// Rotary embedding of x [B, L, H, dh] at positions pos0 + t (kernels/rope.h).
Tensor rope(const Tensor& x, int64_t pos0, double theta);

// ---- sequence ops
// ---------------------------------------------------------------------------------- x [B, L, C], w
// [C, W], bias [C] or undefined, prefix [B, W-1, C] or undefined (the inputs before position 0). y
// = conv (+ SiLU when silu).
Tensor causal_conv1d(const Tensor& x, const Tensor& w, const Tensor& bias,
                     const Tensor& prefix = Tensor(), bool silu = false);

struct SelectiveScanResult {
  Tensor y;       // [B, L, D]
  Tensor h_last;  // [B, D, N], accumulate dtype
};
// The fused selective scan (kernels/selective_scan.h): u, delta_raw, z [B, L, D]; B, C [B, L, N];
// A_log [D, N]; D, dt_bias [D]; h0 [B, D, N]. z, D, dt_bias and h0 may be undefined.
SelectiveScanResult selective_scan(const Tensor& u, const Tensor& delta_raw, const Tensor& A_log,
                                   const Tensor& B, const Tensor& C, const Tensor& D,
                                   const Tensor& dt_bias, const Tensor& z, const Tensor& h0,
                                   int64_t chunk_len = 64);
// Mamba-2's SSD form (hydra.md section 2, docs/MODEL.md): the same recurrence with one decay rate
// per head of P = D / H consecutive channels, h_t = exp(delta_t[h] A[h]) h_{t-1} + delta_t[h] B_t
// u_t, computed as matrix products over chunks of chunk_len steps (within a chunk, a causal
// decay-weighted C B^T; between chunks, a product over the chunks' states). delta_raw [B, L, H];
// A_log, dt_bias [H]; the rest as selective_scan (h0 and h_last [B, D, N] with channel d = h P +
// p). Computes in the accumulate dtype: the fused kernels (kernels/ssd_scan.h) where they take the
// sizes, else ssd_scan_composed.
SelectiveScanResult ssd_scan(const Tensor& u, const Tensor& delta_raw, const Tensor& A_log,
                             const Tensor& B, const Tensor& C, const Tensor& D,
                             const Tensor& dt_bias, const Tensor& z, const Tensor& h0,
                             int64_t chunk_len = 64);
// The same, composed of differentiable ops (batched GEMMs, exp, masks): the fused kernels'
// reference.
SelectiveScanResult ssd_scan_composed(const Tensor& u, const Tensor& delta_raw, const Tensor& A_log,
                                      const Tensor& B, const Tensor& C, const Tensor& D,
                                      const Tensor& dt_bias, const Tensor& z, const Tensor& h0,
                                      int64_t chunk_len = 64);

}  // namespace hydra
