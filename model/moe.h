// Chunk-level mixture of experts with BlockFFN's router (hydra.md section 4, blockffn.md).
//   router input u_j (causal: the previous chunk's mean, or the chunk's first token)
//   s = ReLU(W_r u_j), r = RMSNorm(s); the max_active largest r_e with s_e > 0 are kept
//   out_t = sum_e r_e(chunk of t) * Expert_e(x_t)  (+ an optional shared expert); an expert is a
//   SwiGLU or BlockFFN's non-gated SiLU block (model.moe.expert)
// All tokens of a chunk go to the same experts: dispatch gathers whole chunks, the experts run as
// one grouped GEMM, the combine scatter-adds the weighted outputs back. Losses (weighted, times
// ForwardContext::aux_scale): load balance E * sum_e importance_e * load_e; activation locality
// BCE(p_j, stopgrad(p_{j+1})) over consecutive chunks with p = sigmoid(alpha * W_r u - beta); chunk
// sparsification 1 - prod(1 - p) over groups of chunks, with a coefficient adapted toward
// target_sparsity after every step (update_sparsity_coef()).
#pragma once

#include "model/aux_losses.h"
#include "model/context.h"
#include "model/layers.h"
#include "model/spec.h"

namespace hydra::model {

// The routing of one forward: which experts each chunk uses, and with which weight.
struct MoeRouting {
  int64_t batch = 0, num_chunks = 0, chunk = 0, num_experts = 0;
  std::vector<uint8_t> active;   // [B * nC * E]: expert e serves chunk c
  std::vector<int64_t> dropped;  // chunk-expert assignments dropped by the capacity, per expert
};

// Decoding in segments (LanguageModel::decode): the normalised inputs of the chunk in progress and
// the mean of the last complete chunk (the router input of the chunk after it).
struct MoeCarry {
  Tensor pending;    // [B, position % chunk, d]; undefined at a chunk boundary
  Tensor prev_mean;  // [B, d]; undefined until a chunk completes
};

class ChunkMoE : public Module {
 public:
  ChunkMoE(Init& init, const ModelSpec& spec, int64_t layer);
  // x [B, L, d] (already normalised) -> [B, L, d]; *aux receives the weighted balance, locality
  // and sparsification losses stacked in AuxLoss order (model/lm.h; zeros when routing is off).
  Tensor forward(const Tensor& x, ForwardContext& ctx, Tensor* aux);
  // Decoding: x [B, L, d] (any L) continues the sequence `carry` describes, which it updates; the
  // outputs are forward()'s at the same positions, routed without a capacity (dropless). Each call
  // recomputes the chunk in progress from its start: at most chunk - 1 tokens more.
  Tensor forward_carried(const Tensor& x, ForwardContext& ctx, MoeCarry& carry);
  // Raises the sparsification coefficient when the last measured TLS is below target, lowers it
  // above.
  void update_sparsity_coef();
  double sparsity_coef() const;
  const MoeRouting& last_routing() const { return last_routing_; }
  // Expert parallelism: keeps experts [rank * E / size, (rank + 1) * E / size) of w1, w3, w2 (the
  // rest live on the other ranks of the ep group; chunks travel to them in the forward).
  void shard_experts(int64_t rank, int64_t size);
  int64_t first_local_expert() const { return first_expert_; }
  int64_t num_local_experts() const { return local_experts_; }

  Tensor router_weight, router_norm;  // [E, d], [E]
  Tensor w1, w3, w2;                  // [E, de, d], [E, de, d] (SWIGLU only), [E, d, de]
  std::shared_ptr<SwiGLU> shared;
  Tensor coef;  // buffer [1] f64: the adaptive sparsification coefficient
  // BLOCKFFN's schedule of it (update_sparsity_coef), buffers so that a checkpoint resumes it:
  // {optimizer steps, the last full period's mean loss (0: none yet), ramp start, ramp end, ramp
  // position}, and the current period's summed loss (added on the device: no wait per step).
  Tensor schedule, schedule_window;

 private:
  // s: the router's ReLU output [B * nC, E] (BlockFFN's figures count where it is positive).
  void record_stats(const MoeRouting& routing, const Tensor& q, const Tensor& s,
                    ForwardContext& ctx);

  // Runs the experts on xs (rows grouped by expert, sizes[e] rows for expert e of all E): locally,
  // or over the ep group (dispatch, local experts, combine). Returns the outputs in xs's row order.
  Tensor run_experts(const Tensor& xs, const std::vector<int64_t>& sizes,
                     ForwardContext& ctx) const;

  // The forward's parts, in the order forward() runs them.
  struct Routed;
  // `carried` (decoding): the previous chunk's mean, the first chunk's router input.
  Tensor router_input(const Tensor& x, const ForwardContext& ctx, const Tensor& carried) const;
  // losses null (decoding): no auxiliary losses, no capacity.
  Routed route(const Tensor& x, ForwardContext& ctx, Tensor* losses, const Tensor& carried = {});
  Tensor aux_losses(const Tensor& raw, const Tensor& s, const Tensor& r,
                    const MoeDispatch& dispatch, bool tiled, ForwardContext& ctx,
                    bool* routed_anywhere);
  Routed route_densely(int64_t rows, Device device) const;
  Tensor run_routed(const Tensor& xf, const Routed& rt, ForwardContext& ctx) const;

  int64_t layer_, num_experts_, max_active_, chunk_, seq_group_;
  bool blockffn_;                            // moe.objective BLOCKFFN
  double balance_weight_, locality_weight_;  // resolved: the config's, or the objective's default
  int64_t first_expert_ = 0, local_experts_ = 0;
  config::MoeConfig cfg_;
  double last_tls_ = -1;    // this forward's routing (statistics)
  double global_tls_ = -1;  // over the global batch (drives the sparsification coefficient)
  // The tiled dispatch's counts on their way to the host, and the chunks they are out of: the TLS
  // above is computed from them when next needed (resolve_global_tls), not in the forward.
  std::shared_ptr<PendingHostCopy> pending_counts_;
  double pending_chunks_ = 0;
  void resolve_global_tls();
  Tensor run_experts_tiled(const Tensor& xs, const TiledGroups& groups) const;
  // The coefficient's value on the host, valid while `coef` keeps this storage and version (the
  // forward needs it every step; reading the device buffer each time would stall the GPU's queue).
  struct CoefCache {
    const void* storage = nullptr;
    uint32_t version = 0;
    double value = 0;
  };
  mutable CoefCache coef_cache_;
  // The schedule's host copy, valid while `schedule` keeps this storage and version.
  struct ScheduleCache {
    const void* storage = nullptr;
    uint32_t version = 0;
    std::vector<double> values;
  };
  ScheduleCache schedule_cache_;
  Tensor last_sparsity_;  // the last forward's chunk-sparsification loss
  const parallel::ProcessGrid* last_grid_ = nullptr;  // its ranks (the loss is summed over them)
  void update_blockffn_coef();
  MoeRouting last_routing_;
};

// BLOCKFFN's auxiliary losses as the fused op (moe_aux, the default) or composed of separate ops
// (the reference the fused op is tested against, in tests; the same mathematics). Process-wide.
void set_fused_moe_aux(bool on);
// The routed experts' weighted combine as one op (moe_combine, the default) or as a gather of the
// weights, a multiply and a gather-sum (the reference, in tests). Process-wide.
void set_fused_moe_combine(bool on);

// BlockFFN's activation locality loss over router logits z = alpha * W_r u - beta [B, nC, E]:
// mean over consecutive chunks of BCE(sigmoid(z_j), target sigmoid(z_{j+1})), the target held
// constant (stop-gradient). Zero for a single chunk.
Tensor moe_locality_loss(const Tensor& z);
// The sum of those BCE terms, with z_next [B, E] (or undefined): the next sequence shard's first
// chunk, whose pair with our last chunk crosses the shard boundary (sequence parallelism).
Tensor moe_locality_sum(const Tensor& z, const Tensor& z_next);
// Chunk sparsification: P_{g,e} = 1 - prod_{j in g} (1 - sigmoid(z_j,e)) over groups of `group`
// consecutive chunks; the mean of P over groups and experts (= mean_g sum_e P / E).
Tensor moe_sparsity_loss(const Tensor& z, int64_t group);
// The sum of the P terms (the loss times B * groups * E).
Tensor moe_sparsity_sum(const Tensor& z, int64_t group);
// BlockFFN's chunk sparsification over the chunk-routed activation probabilities p [B, nC, E]
// (p = s / (sum_e s + 1e-5)), every token of a chunk sharing its chunk's p: per group of `group`
// chunks and expert, 1 - exp(chunk_len * sum_{chunks} log(1 - p + 1e-5)) (the probability that the
// expert fires for some token of the group), summed over batch, whole groups and experts.
Tensor moe_blockffn_sparsity_sum(const Tensor& p, int64_t group, int64_t chunk_len);
// BlockFFN's activation locality summed over a sequence's consecutive token pairs, for chunk-routed
// logits z = alpha * raw [B, nC, E]: the pairs across chunks (and across the shard boundary when
// z_next is given), BCE(z_prev, sigmoid(z)), plus chunk_len - 1 pairs inside each chunk, BCE(z,
// sigmoid(z)). Targets are detached (BlockFFN's code keeps them: docs/MODEL.md says why we do not).
Tensor moe_blockffn_locality_sum(const Tensor& z, const Tensor& z_next, int64_t chunk_len);

// Token-level and chunk-level sparsity of a routing: TLS = 1 - mean active / E; CLS(w) = 1 - mean
// over windows of w consecutive tokens of |union of active experts| / E.
double routing_tls(const MoeRouting& r);
double routing_cls(const MoeRouting& r, int64_t window);
// BlockFFN's chunk-level sparsity (spec/blockffn.md): CLS(L) = 1 - mean over aligned,
// non-overlapping windows [kL, (k+1)L) of |union of active experts| / E; CLS(1) is the TLS. Only
// whole windows count: -1 when a sequence is shorter than L.
double routing_cls_aligned(const MoeRouting& r, int64_t window);
// The windows BlockFFN logs: L = 1, 2, 4, ..., 64.
inline constexpr int64_t kClsWindows[] = {1, 2, 4, 8, 16, 32, 64};
// routing_cls_aligned for L = 1, 2, 4, ..., 2^(levels - 1) (kClsWindows), each level's windows made
// from pairs of the level below's (equal to calling it per window; -1 where no whole window fits).
std::vector<double> routing_cls_aligned_doubling(const MoeRouting& r, int64_t levels);

}  // namespace hydra::model
