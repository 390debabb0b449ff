#include "model/moe.h"

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <numeric>

#include "autograd/grad_mode.h"
#include "parallel/collectives.h"
#include "parallel/experts.h"

namespace hydra::model {
namespace {

std::atomic<bool> g_fused_aux{true};      // set_fused_moe_aux
std::atomic<bool> g_fused_combine{true};  // set_fused_moe_combine

// Counts over the whole global batch that normalise the auxiliary losses, so that the ranks'
// shares add up to the single-process loss (summed over the ranks in one host all-reduce).
struct GlobalCounts {
  explicit GlobalCounts(int64_t experts) : active(experts, 0.0) {}
  std::vector<double> active;  // [E]: chunks each expert serves (PACKED dispatch; TILED: zero)
  double chunks = 0;           // chunks routed
  double locality_terms = 0;   // (neighbouring pair, expert) terms of the locality loss
  double sparsity_terms = 0;   // (sparsity group, expert) terms of the sparsification loss
};

}  // namespace

void set_fused_moe_aux(bool on) { g_fused_aux.store(on); }
void set_fused_moe_combine(bool on) { g_fused_combine.store(on); }

ChunkMoE::ChunkMoE(Init& init, const ModelSpec& spec, int64_t layer)
    : layer_(layer),
      num_experts_(spec.num_experts),
      max_active_(spec.max_active),
      chunk_(spec.moe_chunk),
      seq_group_(spec.cfg.moe().sparsity_group()),
      blockffn_(spec.cfg.moe().objective() == config::MoeConfig::BLOCKFFN),
      cfg_(spec.cfg.moe()) {
  // (With objective BLOCKFFN, config::resolve_defaults has put BlockFFN's values in the fields the
  // config left unset.)
  balance_weight_ = cfg_.balance_loss_weight();
  locality_weight_ = cfg_.locality_loss_weight();
  const double coef_init = cfg_.sparsity_coef_init();
  const int64_t E = num_experts_, d = spec.d, de = spec.d_expert;
  const double out_std = spec.init_std / std::sqrt(2.0 * spec.num_blocks);
  // The router computes in its master dtype under mixed precision: its top-k choices, routing
  // weights and auxiliary losses are precision-sensitive, and it is a small [E, d] GEMM.
  // Their learning rate: the optimizer's router_lr group (0: the model's).
  router_weight =
      register_parameter("router_weight", init.normal({E, d}, spec.init_std),
                         ParamOptions{.lr_group = "moe_router", .keep_master_dtype = true});
  router_norm = register_parameter(
      "router_norm", ones({E}),
      ParamOptions{.weight_decay = false, .lr_group = "moe_router", .keep_master_dtype = true});
  w1 = register_parameter("w1", init.normal({E, de, d}, spec.init_std));
  if (spec.gated_experts) w3 = register_parameter("w3", init.normal({E, de, d}, spec.init_std));
  w2 = register_parameter("w2", init.normal({E, d, de}, out_std));
  if (spec.shared_expert)
    shared = register_module(
        "shared", std::make_shared<SwiGLU>(init, d, spec.d_shared, spec.init_std, out_std));
  coef = register_buffer("sparsity_coef", full({1}, coef_init, DType::kF64));
  if (blockffn_) {
    schedule = register_buffer("sparsity_schedule",
                               tensor(std::vector<double>{0, 0, coef_init, coef_init, 0}, {5}));
    schedule_window = register_buffer("sparsity_window", zeros({1}, DType::kF64));
  }
  local_experts_ = E;
}

void ChunkMoE::shard_experts(int64_t rank, int64_t size) {
  HYDRA_CHECK(size >= 1 && num_experts_ % size == 0 && rank >= 0 && rank < size)
      << "moe: " << num_experts_ << " experts cannot be split over " << size << " ranks";
  HYDRA_CHECK(local_experts_ == num_experts_) << "moe: experts are already sharded";
  NoGradGuard ng;
  local_experts_ = num_experts_ / size;
  first_expert_ = rank * local_experts_;
  for (const Tensor& w : {w1, w3, w2})
    if (w.defined())
      replace_data(w, w.narrow(0, first_expert_, local_experts_).contiguous().clone());
}

Tensor ChunkMoE::run_experts(const Tensor& xs, const std::vector<int64_t>& sizes,
                             ForwardContext& ctx) const {
  auto experts = [&](const Tensor& rows,
                     const std::vector<int64_t>& groups) {    // grouped_linear's groups
    const Tensor a = silu(grouped_linear(rows, w1, groups));  // SILU: W2 SiLU(W1 x)
    const Tensor h = w3.defined() ? mul(a, grouped_linear(rows, w3, groups)) : a;
    return grouped_linear(h, w2, groups);
  };
  if (local_experts_ == num_experts_) return experts(xs, sizes);
  parallel::Communicator& ep = ctx.grid->ep();
  const parallel::ExpertDispatch d = parallel::dispatch_to_experts(xs, sizes, local_experts_, ep);
  return parallel::combine_from_experts(experts(d.rows, d.groups), d, ep);
}

Tensor ChunkMoE::run_experts_tiled(const Tensor& xs, const TiledGroups& groups) const {
  const Tensor a = silu(tiled_linear(xs, w1, groups));
  const Tensor h = w3.defined() ? mul(a, tiled_linear(xs, w3, groups)) : a;
  return tiled_linear(h, w2, groups);
}

double ChunkMoE::sparsity_coef() const {
  if (coef_cache_.storage != coef.storage().get() || coef_cache_.version != coef.version())
    coef_cache_ = {coef.storage().get(), coef.version(),
                   coef.item<double>()};  // loaded, moved or new
  return coef_cache_.value;
}

void ChunkMoE::resolve_global_tls() {
  if (!pending_counts_) return;
  const std::vector<int64_t>& host = pending_counts_->get();  // counts, then dropped
  double total = 0;
  for (int64_t e = 0; e < num_experts_; ++e) total += double(host[e]);
  global_tls_ = pending_chunks_ > 0 ? 1.0 - total / (pending_chunks_ * double(num_experts_)) : -1.0;
  pending_counts_.reset();
}

// BlockFFN's AdaptiveLinearScheduler (spec/blockffn.md), per layer, on this layer's mean
// chunk-sparsification loss L_CS summed over the ranks: periods of P steps end at multiples of P;
// at the end of one after the hold, ratio = its mean / the period before's (>= 1.025 when above 1,
// <= cap x start / now), and the coefficient moves linearly to now x ratio over the next P steps.
void ChunkMoE::update_blockffn_coef() {
  const int64_t hold = cfg_.blockffn_hold_steps(), P = cfg_.blockffn_period();
  if (hold < 0 || !last_sparsity_.defined()) return;
  NoGradGuard no_grad;
  if (schedule_cache_.storage != schedule.storage().get() ||
      schedule_cache_.version != schedule.version())  // new, loaded or moved: read it once
    schedule_cache_ = {schedule.storage().get(), schedule.version(), schedule.to_vector<double>()};
  std::vector<double> st = schedule_cache_.values;  // steps, previous mean, from, to, position
  schedule_window.add_(last_sparsity_.to(DType::kF64).reshape({1}));  // on the device
  st[0] += 1;
  double now = sparsity_coef();
  if (st[4] < double(P) && st[3] != st[2]) {  // a ramp in progress
    st[4] += 1;
    now = st[2] + (st[3] - st[2]) * st[4] / double(P);
  }
  if (static_cast<int64_t>(st[0]) % P == 0) {  // a period ends: one read of the device per period
    double sum = schedule_window.item<double>();
    parallel::HostSum().add(sum).sum(
        last_grid_ != nullptr && last_grid_->distributed() ? &last_grid_->world() : nullptr);
    schedule_window.zero_();
    const double mean = sum / double(P);
    if (st[0] >= double(hold + P) && st[1] > 0) {
      double ratio = mean / st[1];
      if (ratio > 1) ratio = std::max(1.025, ratio);
      ratio = std::min(cfg_.blockffn_cap() * cfg_.sparsity_coef_init() / now, ratio);
      st[2] = now;
      st[3] = now * ratio;
      st[4] = 0;
    }
    st[1] = mean;
  }
  schedule.copy_(tensor(st, {5}).to(schedule.device()));
  schedule_cache_ = {schedule.storage().get(), schedule.version(), st};
  if (now != sparsity_coef()) {
    coef.fill_(now);
    coef_cache_ = {coef.storage().get(), coef.version(), now};
  }
}

void ChunkMoE::update_sparsity_coef() {
  if (blockffn_) return update_blockffn_coef();
  // The TLS of the whole global batch (the same on every rank, so the coefficient stays in sync).
  resolve_global_tls();
  if (global_tls_ < 0) return;
  const double direction = global_tls_ < cfg_.target_sparsity() ? 1.0 : -1.0;
  const double next = std::clamp(sparsity_coef() * std::exp(direction * cfg_.sparsity_adapt_rate()),
                                 1e-8, cfg_.sparsity_coef_max());
  NoGradGuard no_grad;
  coef.fill_(next);
  coef_cache_ = {coef.storage().get(), coef.version(), next};
}

Tensor moe_locality_sum(const Tensor& z, const Tensor& z_next) {
  const int64_t nC = z.size(1);
  std::vector<Tensor> terms;
  if (nC >= 2) {
    const Tensor zl = z.narrow(1, 0, nC - 1), target = sigmoid(z.narrow(1, 1, nC - 1)).detach();
    terms.push_back(
        sum(sub(softplus(zl), mul(zl, target))));  // BCE with logits: softplus(z) - z * target
  }
  if (z_next.defined()) {  // the pair across the shard boundary: our last chunk, the next shard's
                           // first
    const Tensor zl = z.narrow(1, nC - 1, 1).squeeze(1), target = sigmoid(z_next).detach();
    terms.push_back(sum(sub(softplus(zl), mul(zl, target))));
  }
  if (terms.empty()) return zeros({}, z.dtype(), z.device());
  return terms.size() == 1 ? terms[0] : add(terms[0], terms[1]);
}

Tensor moe_locality_loss(const Tensor& z) {
  const int64_t B = z.size(0), nC = z.size(1), E = z.size(2);
  if (nC < 2) return zeros({}, z.dtype(), z.device());
  return mul(moe_locality_sum(z, Tensor()), 1.0 / double(B * (nC - 1) * E));
}

Tensor moe_sparsity_sum(const Tensor& z, int64_t group) {
  const int64_t B = z.size(0), nC = z.size(1), E = z.size(2), ng = nC / group;
  if (ng < 1) return zeros({}, z.dtype(), z.device());
  // 1 - prod (1 - p) = 1 - exp(sum log(1 - sigmoid(z))) = 1 - exp(-sum softplus(z))
  const Tensor sp = sum(softplus(z.narrow(1, 0, ng * group)).reshape({B, ng, group, E}), {2});
  return sum(affine(exp(neg(sp)), -1.0, 1.0));
}

Tensor moe_blockffn_sparsity_sum(const Tensor& p, int64_t group, int64_t chunk_len) {
  const int64_t B = p.size(0), nC = p.size(1), E = p.size(2), ng = nC / group;
  if (ng < 1) return zeros({}, p.dtype(), p.device());
  const Tensor lq = log(affine(p.narrow(1, 0, ng * group), -1.0, 1.0 + 1e-5));  // log(1 - p + eps)
  const Tensor none = exp(mul(sum(lq.reshape({B, ng, group, E}), {2}), double(chunk_len)));
  return sum(affine(none, -1.0, 1.0));
}

Tensor moe_blockffn_locality_sum(const Tensor& z, const Tensor& z_next, int64_t chunk_len) {
  Tensor out = moe_locality_sum(z, z_next);  // the pairs across chunks
  if (chunk_len > 1) {                       // inside a chunk both tokens carry the same logits
    const Tensor within = sum(sub(softplus(z), mul(z, sigmoid(z).detach())));
    out = add(out, mul(within, double(chunk_len - 1)));
  }
  return out;
}

Tensor moe_sparsity_loss(const Tensor& z, int64_t group) {
  const int64_t B = z.size(0), nC = z.size(1), E = z.size(2), ng = nC / group;
  if (ng < 1) return zeros({}, z.dtype(), z.device());
  return mul(moe_sparsity_sum(z, group), 1.0 / double(B * ng * E));
}

double routing_tls(const MoeRouting& r) {
  const int64_t n = r.batch * r.num_chunks;
  if (n == 0) return 0;
  const int64_t active = std::accumulate(r.active.begin(), r.active.end(), int64_t{0});
  return 1.0 - double(active) / double(n * r.num_experts);
}

namespace {

// Each chunk's active experts as a bit set of `words` 64-bit words ([B * nC][words]): a window's
// distinct experts are the popcount of its chunks' union.
std::vector<uint64_t> chunk_expert_bits(const MoeRouting& r, int64_t words) {
  const int64_t E = r.num_experts, n = r.batch * r.num_chunks;
  std::vector<uint64_t> bits(static_cast<std::size_t>(n * words), 0);
  const uint8_t* a = r.active.data();
  if (words == 1) {  // up to 64 experts: one word a chunk, built in a register
    for (int64_t c = 0; c < n; ++c) {
      uint64_t w = 0;
      for (int64_t e = 0; e < E; ++e) w |= uint64_t{a[c * E + e] != 0} << e;
      bits[c] = w;
    }
    return bits;
  }
  for (int64_t c = 0; c < n; ++c)
    for (int64_t e = 0; e < E; ++e)
      bits[c * words + e / 64] |= uint64_t{a[c * E + e] != 0} << (e % 64);
  return bits;
}

// The union of chunks [c0, c1] of a sequence's bit sets (row0: its first chunk) into u[0, words).
void chunk_union(const std::vector<uint64_t>& bits, int64_t words, int64_t row0, int64_t c0,
                 int64_t c1, uint64_t* u) {
  std::fill(u, u + words, uint64_t{0});
  for (int64_t c = c0; c <= c1; ++c)
    for (int64_t w = 0; w < words; ++w) u[w] |= bits[(row0 + c) * words + w];
}

int64_t popcount_words(const uint64_t* u, int64_t words) {
  int64_t n = 0;
  for (int64_t w = 0; w < words; ++w) n += std::popcount(u[w]);
  return n;
}

// CLS from the distinct experts summed over `count` windows: 1 - sum / (E count). The sum is an
// integer, so any order of counting gives the same value.
double cls_of(int64_t distinct_sum, int64_t count, int64_t E) {
  return 1.0 - double(distinct_sum) / double(E * count);
}

}  // namespace

// Windows [t, t + window) that start in the same chunk c0 and end in the same chunk c1 have the
// same experts: each chunk's windows come in runs of equal c1 (at most window / chunk + 2 of them),
// whose union grows by one chunk from run to run.
namespace {

// routing_cls with the chunks' bit sets made (chunk_expert_bits).
double routing_cls_of_bits(const MoeRouting& r, const std::vector<uint64_t>& bits, int64_t window) {
  const int64_t L = r.num_chunks * r.chunk, E = r.num_experts, C = r.chunk;
  if (L < window || r.batch == 0) return routing_tls(r);
  const int64_t words = (E + 63) / 64;
  std::vector<uint64_t> u(static_cast<std::size_t>(words));
  int64_t sum = 0, count = 0;
  for (int64_t b = 0; b < r.batch; ++b) {
    const int64_t row0 = b * r.num_chunks;
    for (int64_t c0 = 0; c0 * C + window <= L; ++c0) {
      const int64_t t_end = std::min((c0 + 1) * C, L - window + 1);  // starts in this chunk
      int64_t t = c0 * C, c1 = (t + window - 1) / C;
      chunk_union(bits, words, row0, c0, c1, u.data());
      while (t < t_end) {
        const int64_t run_end = std::min(t_end, (c1 + 1) * C - window + 1);
        sum += (run_end - t) * popcount_words(u.data(), words);
        count += run_end - t;
        t = run_end;
        if (t < t_end) {
          ++c1;
          for (int64_t w = 0; w < words; ++w) u[w] |= bits[(row0 + c1) * words + w];
        }
      }
    }
  }
  return cls_of(sum, count, E);
}

}  // namespace

double routing_cls(const MoeRouting& r, int64_t window) {
  return routing_cls_of_bits(r, chunk_expert_bits(r, (r.num_experts + 63) / 64), window);
}

double routing_cls_aligned(const MoeRouting& r, int64_t window) {
  const int64_t L = r.num_chunks * r.chunk, E = r.num_experts, windows = L / window;
  if (windows == 0 || r.batch == 0 || E == 0) return -1;
  const int64_t words = (E + 63) / 64;
  const std::vector<uint64_t> bits = chunk_expert_bits(r, words);
  std::vector<uint64_t> u(static_cast<std::size_t>(words));
  int64_t sum = 0;
  for (int64_t b = 0; b < r.batch; ++b)
    for (int64_t k = 0; k < windows; ++k) {
      chunk_union(bits, words, b * r.num_chunks, k * window / r.chunk,
                  ((k + 1) * window - 1) / r.chunk, u.data());
      sum += popcount_words(u.data(), words);
    }
  return cls_of(sum, r.batch * windows, E);
}

// Aligned windows of 2L are pairs of aligned windows of L, so each window's experts are the union
// of two of the level below: every level costs half the one before. When the chunk is a power of
// two, 2^m tokens, the windows up to it lie inside one chunk each (a chunk holds 2^(m - i) windows
// of 2^i tokens), and the doubling starts from the chunks; otherwise from the tokens.
namespace {

// routing_cls_aligned_doubling with the chunks' bit sets made (chunk_expert_bits).
std::vector<double> cls_aligned_doubling_of_bits(const MoeRouting& r,
                                                 const std::vector<uint64_t>& bits,
                                                 int64_t levels) {
  const int64_t C = r.chunk, nC = r.num_chunks, L = nC * C, E = r.num_experts;
  const int64_t words = (E + 63) / 64;
  const bool by_chunks = C > 0 && (C & (C - 1)) == 0;
  const int64_t m = by_chunks ? std::countr_zero(static_cast<uint64_t>(C)) : 0;
  std::vector<int64_t> sums(static_cast<std::size_t>(levels), 0);
  std::vector<uint64_t> level(static_cast<std::size_t>((by_chunks ? nC : L) * words));
  for (int64_t b = 0; b < r.batch && E > 0; ++b) {
    const uint64_t* rows = &bits[b * nC * words];
    int64_t first = 0, windows = L;  // the level `level` holds, and its windows
    if (by_chunks) {
      std::copy(rows, rows + nC * words, level.begin());
      int64_t chunk_sum = 0;
      for (int64_t c = 0; c < nC; ++c) chunk_sum += popcount_words(rows + c * words, words);
      for (int64_t i = 0; i < std::min(levels, m); ++i) sums[i] += (C >> i) * chunk_sum;
      first = m;
      windows = nC;
    } else {
      for (int64_t c = 0; c < nC; ++c)
        for (int64_t j = 0; j < C; ++j)
          std::copy(rows + c * words, rows + (c + 1) * words, &level[(c * C + j) * words]);
    }
    for (int64_t i = first; i < levels && windows > 0; ++i, windows /= 2) {
      if (i > first)
        for (int64_t k = 0; k < windows; ++k)
          for (int64_t w = 0; w < words; ++w)
            level[k * words + w] = level[2 * k * words + w] | level[(2 * k + 1) * words + w];
      for (int64_t k = 0; k < windows; ++k) sums[i] += popcount_words(&level[k * words], words);
    }
  }
  std::vector<double> out(static_cast<std::size_t>(levels), -1.0);
  for (int64_t i = 0, windows = L; i < levels && windows > 0 && r.batch > 0 && E > 0;
       ++i, windows /= 2)
    out[i] = cls_of(sums[i], r.batch * windows, E);
  return out;
}

}  // namespace

std::vector<double> routing_cls_aligned_doubling(const MoeRouting& r, int64_t levels) {
  return cls_aligned_doubling_of_bits(r, chunk_expert_bits(r, (r.num_experts + 63) / 64), levels);
}

// record_stats takes BlockFFN's windows from routing_cls_aligned_doubling: they must double from 1.
constexpr bool windows_double_from_one() {
  for (std::size_t i = 0; i < std::size(kClsWindows); ++i)
    if (kClsWindows[i] != int64_t{1} << i) return false;
  return true;
}
static_assert(windows_double_from_one(),
              "kClsWindows must be 1, 2, 4, ... (the doubling's levels)");

namespace {

// Calls fn(values, n) with a host tensor's values in its own floating type, without converting them
// to double first (a statistics step reads about 100K values a MoE layer).
template <class F>
void visit_host_values(const Tensor& t, F&& fn) {
  const Tensor c = t.cpu().contiguous();  // host copies already: no copy
  if (c.dtype() == DType::kF32) return fn(static_cast<const float*>(c.raw_data()), c.numel());
  if (c.dtype() == DType::kF64) return fn(static_cast<const double*>(c.raw_data()), c.numel());
  const std::vector<double> v = c.to_vector<double>();
  fn(v.data(), static_cast<int64_t>(v.size()));
}

// Chunks whose bit set is empty: no expert serves them.
int64_t chunks_without_expert(const std::vector<uint64_t>& bits, int64_t chunks, int64_t words) {
  if (words == 0) return chunks;  // no experts
  int64_t n = 0;
  for (int64_t c = 0; c < chunks; ++c) n += popcount_words(&bits[c * words], words) == 0;
  return n;
}

}  // namespace

void ChunkMoE::record_stats(const MoeRouting& routing, const Tensor& q, const Tensor& s,
                            ForwardContext& ctx) {
  const std::string p = "moe." + std::to_string(layer_) + ".";
  const int64_t E = num_experts_, BC = routing.batch * routing.num_chunks, words = (E + 63) / 64;
  last_tls_ = routing_tls(routing);
  last_routing_ = routing;
  // Each chunk's experts as a bit set, made once for the kept routing and once for the router's.
  const std::vector<uint64_t> kept_bits = chunk_expert_bits(routing, words);
  ctx.stat(p + "tls", last_tls_);
  ctx.stat(p + "cls8", routing_cls_of_bits(routing, kept_bits, 8));
  // BlockFFN's figures: from the router's own output (an expert is active where its ReLU output is
  // positive), before max_active and the capacity, over aligned windows; and the same after them
  // (what the experts computed).
  MoeRouting router = routing;
  visit_host_values(s, [&](const auto* v, int64_t n) {
    HYDRA_CHECK(n == static_cast<int64_t>(router.active.size()))
        << "moe statistics: " << n << " router outputs for " << router.active.size()
        << " chunk-expert pairs";
    for (int64_t i = 0; i < n; ++i) router.active[i] = v[i] > 0;
  });
  const std::vector<uint64_t> router_bits = chunk_expert_bits(router, words);
  const std::string b = "block." + std::to_string(layer_) + ".moe.";
  // Chunks (so tokens) for which the router fires no expert.
  const int64_t silent = chunks_without_expert(router_bits, BC, words);
  ctx.stat(b + "tls", routing_tls(router));
  ctx.stat(b + "tls_kept", last_tls_);
  ctx.stat(b + "no_expert_frac", BC ? double(silent) / double(BC) : 0.0);
  const int64_t levels = std::size(kClsWindows);
  const std::vector<double> pre = cls_aligned_doubling_of_bits(router, router_bits, levels),
                            kept = cls_aligned_doubling_of_bits(routing, kept_bits, levels);
  for (int64_t i = 0; i < levels; ++i) {
    if (pre[i] < 0) continue;
    ctx.stat(b + "cls." + std::to_string(kClsWindows[i]), pre[i]);
    ctx.stat(b + "cls_kept." + std::to_string(kClsWindows[i]), kept[i]);
  }
  int64_t total = 0, dropped = 0;
  std::vector<int64_t> load(E, 0);
  for (int64_t c = 0; c < BC; ++c)
    for (int64_t e = 0; e < E; ++e) load[e] += routing.active[c * E + e];
  for (int64_t e = 0; e < E; ++e) {
    total += load[e];
    dropped += routing.dropped[e];
  }
  for (int64_t e = 0; e < E; ++e)
    ctx.stat(p + "load." + std::to_string(e), total ? double(load[e]) / double(total) : 0.0);
  ctx.stat(p + "dropped_tokens", double(dropped * chunk_));
  ctx.stat(p + "dropped_frac", total + dropped ? double(dropped) / double(total + dropped) : 0.0);
  ctx.stat(p + "active_per_chunk", BC ? double(total) / double(BC) : 0.0);
  // Routing health: experts no chunk reached, and chunks that reached no expert (their tokens get
  // no FFN output at all from this layer).
  int64_t dead = 0;
  for (int64_t e = 0; e < E; ++e) dead += load[e] == 0;
  const int64_t empty = chunks_without_expert(kept_bits, BC, words);
  ctx.stat(p + "dead_experts", double(dead));
  ctx.stat(p + "empty_chunk_frac", BC ? double(empty) / double(BC) : 0.0);
  // The router's entropy, summed in double; the logarithm in the values' own precision.
  double ent = 0;
  visit_host_values(q, [&](const auto* v, int64_t n) {
    for (int64_t i = 0; i < n; ++i)
      if (v[i] > 0) ent -= double(v[i]) * double(std::log(v[i]));
  });
  ctx.stat(p + "router_entropy", BC ? ent / double(BC) : 0.0);
  ctx.stat(p + "sparsity_coef", sparsity_coef());
}

// How the forward's rows reach the experts (route or route_densely) and come back (run_routed).
struct ChunkMoE::Routed {
  std::vector<int64_t> sizes;   // rows per expert (PACKED or dense)
  Tensor perm, widx, inv;       // the dispatch order and its inverse (kernels/moe_route.h)
  Tensor w;                     // [B, nC, E] routing weights (undefined: dense, weight 1/E)
  TiledGroups tiled;            // tiled.tile > 0: the TILED dispatch
  bool routed_anywhere = true;  // false: no chunk of the global batch chose any expert
};

Tensor ChunkMoE::forward(const Tensor& x, ForwardContext& ctx, Tensor* aux) {
  const int64_t B = x.size(0), L = x.size(1), d = x.size(2), c = chunk_;
  HYDRA_CHECK(L % c == 0) << "moe: sequence length " << L << " is not a multiple of moe.chunk "
                          << c;
  const int64_t BL = B * L;
  // The router and its auxiliary losses compute in the router's dtype: the activations' dtype, or
  // fp32 under mixed precision (keep_master_dtype).
  Tensor losses = zeros({kNumAuxLosses}, router_weight.dtype(), x.device());
  const Routed rt = ctx.paths.moe_routing ? route(x, ctx, &losses) : route_densely(BL, x.device());
  if (aux != nullptr) *aux = losses;
  // The experts' view of x after the router's: its backward runs first, so the router's chunk
  // means and first tokens add into x's gradient in place (gradient_sum_target) instead of
  // through a sum of full-size gradients.
  const Tensor xf = x.reshape({BL, d});
  Tensor out = run_routed(xf, rt, ctx);
  if (shared) out = add(out, shared->forward(xf));
  return out.view({B, L, d});
}

Tensor ChunkMoE::forward_carried(const Tensor& x, ForwardContext& ctx, MoeCarry& carry) {
  const int64_t B = x.size(0), d = x.size(2), c = chunk_;
  // The padding's outputs are dropped; the router reads a chunk's first token or the chunk before,
  // never the padding.
  const ChunkedSegment seg(carry.pending, x, c);
  const int64_t rows = B * seg.padded.size(1);
  const Tensor xf = seg.padded.reshape({rows, d});
  const Routed rt = ctx.paths.moe_routing ? route(seg.padded, ctx, nullptr, carry.prev_mean)
                                          : route_densely(rows, x.device());
  Tensor out = run_routed(xf, rt, ctx);
  if (shared) out = add(out, shared->forward(xf));
  if (seg.whole > 0 && cfg_.router_input() == config::MoeConfig::PREV_CHUNK_MEAN)
    carry.prev_mean = mean(seg.from_start.narrow(1, (seg.whole - 1) * c, c), {1});
  carry.pending = seg.pending_after();
  return seg.segment(out.view({B, seg.padded.size(1), d}));
}

// The router's input per chunk: its first token, or (PREV_CHUNK_MEAN) the previous chunk's mean,
// the first chunk of the sequence by its first token. A sequence shard's first chunk gets the
// previous shard's last chunk mean (rank 0: first token). x [B, nC c, d] -> [B, nC, d].
Tensor ChunkMoE::router_input(const Tensor& x, const ForwardContext& ctx,
                              const Tensor& carried) const {
  const int64_t B = x.size(0), c = chunk_, nC = x.size(1) / c, d = x.size(2);
  const Tensor xr = x.view({B, nC, c, d});
  if (cfg_.router_input() != config::MoeConfig::PREV_CHUNK_MEAN) return xr.select(2, 0);
  // The sequence's first token [B, 1, d], a slice of x itself: the chunk means' view then has one
  // reader, and both backwards can add into x's gradient sum in place.
  const auto first_token = [&] { return x.narrow(1, 0, 1); };
  std::vector<Tensor> parts;
  if (ctx.sequence_parallel()) {
    const Tensor prev =
        parallel::shift_from_previous(mean(xr.select(1, nC - 1), {1}), ctx.grid->sp());
    parts.push_back(ctx.grid->sp_rank() == 0 ? first_token() : prev.unsqueeze(1));
  } else if (carried.defined()) {
    parts.push_back(carried.unsqueeze(1));
  } else {
    parts.push_back(first_token());
  }
  if (nC > 1) parts.push_back(mean(xr, {2}).narrow(1, 0, nC - 1));
  return parts.size() == 1 ? parts[0] : concat(parts, 1);
}

// The router (ReLU, RMSNorm), the dispatch on the device and the auxiliary losses into *losses.
ChunkMoE::Routed ChunkMoE::route(const Tensor& x, ForwardContext& ctx, Tensor* losses,
                                 const Tensor& carried) {
  const int64_t B = x.size(0), L = x.size(1), E = num_experts_, c = chunk_, nC = L / c;
  // The tiled dispatch (moe.dispatch): the experts' GEMMs are launched without the counts, so the
  // device never waits for the host here. It needs every expert and the whole batch's counts in
  // this process (no expert parallelism, no ranks to sum the counts over).
  const bool one_process =
      local_experts_ == num_experts_ && !(ctx.grid != nullptr && ctx.grid->distributed());
  const bool tiled =
      one_process && (cfg_.dispatch() == config::MoeConfig::TILED ||
                      (cfg_.dispatch() == config::MoeConfig::AUTO && x.device().is_cuda()));
  const Tensor rin = router_input(x, ctx, carried);
  const Tensor raw = linear(rin.to(router_weight.dtype()), router_weight);  // [B, nC, E]
  const Tensor s = relu(raw);
  const Tensor r = rms_norm(s, router_norm, cfg_.router_eps());
  // The routing on the device; only the per-expert counts come to the host.
  const double cf = losses != nullptr ? cfg_.capacity_factor() : 0.0;
  const int64_t capacity =
      cf > 0 ? std::max<int64_t>(1, static_cast<int64_t>(std::ceil(
                                        cf * double(B * nC) * double(max_active_) / double(E))))
             : 0;
  const MoeDispatch dispatch = moe_route(r.reshape({B * nC, E}), s.reshape({B * nC, E}), B, c,
                                         max_active_, capacity, tiled ? cfg_.dispatch_tile() : 0);
  Routed rt;
  rt.w = mul(r, dispatch.mask.view({B, nC, E})).to(x.dtype());
  rt.perm = dispatch.perm;
  rt.widx = dispatch.widx;
  rt.inv = dispatch.inverse;
  rt.sizes.assign(E, 0);
  if (tiled) {
    rt.tiled.tile = cfg_.dispatch_tile();
    rt.tiled.tiles = dispatch.tiles;
    rt.tiled.sizes = [pending = dispatch.host_counts, E, c] {
      const std::vector<int64_t>& host = pending->get();
      std::vector<int64_t> rows(E);
      for (int64_t e = 0; e < E; ++e) rows[e] = host[e] * c;
      return rows;
    };
  } else {
    for (int64_t e = 0; e < E; ++e) rt.sizes[e] = dispatch.counts[e] * c;
  }
  if (losses != nullptr) *losses = aux_losses(raw, s, r, dispatch, tiled, ctx, &rt.routed_anywhere);
  return rt;
}

// The weighted balance, locality and sparsification losses (AuxLoss order), each normalised by
// its count over the whole global batch, so that the ranks' shares add up to the single-process
// loss (the global counts: one host all-reduce); and the routing's statistics when recording.
Tensor ChunkMoE::aux_losses(const Tensor& raw, const Tensor& s, const Tensor& r,
                            const MoeDispatch& dispatch, bool tiled, ForwardContext& ctx,
                            bool* routed_anywhere) {
  const int64_t B = raw.size(0), nC = raw.size(1), E = num_experts_, c = chunk_;
  const DType rdt = raw.dtype();
  const Device dev = raw.device();
  // BLOCKFFN's locality logits are alpha * raw (no beta).
  const double beta = blockffn_ ? 0.0 : -cfg_.activation_beta();
  const bool fused = blockffn_ && g_fused_aux.load();
  const Tensor z = fused ? Tensor() : affine(raw, cfg_.activation_alpha(), beta);
  Tensor z_next;  // the next shard's first chunk logits (the locality target across the boundary)
  if (ctx.sequence_parallel()) {
    const Tensor first = affine(raw.select(1, 0).detach(), cfg_.activation_alpha(), beta);
    z_next = parallel::shift_from_next(first, ctx.grid->sp()).detach();
    if (ctx.grid->sp_rank() + 1 == ctx.grid->shape().sp) z_next = Tensor();
  }
  GlobalCounts counts(E);
  if (!tiled)
    for (int64_t e = 0; e < E; ++e) counts.active[e] = double(dispatch.counts[e]);
  counts.chunks = double(B * nC);
  // Locality pairs: consecutive chunks (HYDRA) or consecutive tokens (BLOCKFFN), with the pair
  // across the shard boundary.
  const int64_t pairs = blockffn_ ? nC * c - 1 : std::max<int64_t>(nC - 1, 0);
  counts.locality_terms =
      double(B * (std::max<int64_t>(pairs, 0) + (z_next.defined() ? 1 : 0)) * E);
  const int64_t groups = nC / seq_group_;  // whole groups of chunks only
  counts.sparsity_terms = double(B * groups * E);
  ctx.world_sum(parallel::HostSum()
                    .add(counts.active)
                    .add(counts.chunks)
                    .add(counts.locality_terms)
                    .add(counts.sparsity_terms));
  Tensor load;  // [E]: each expert's share of the kept (chunk, expert) pairs
  if (tiled) {  // on the device; the TLS when the coefficient is next updated
    const Tensor kept = dispatch.device_counts.select(0, 0).to(rdt);
    load = div(kept, add(sum(kept), 1e-30));  // 0 / 1e-30 = 0 when nothing was kept
    pending_counts_ = dispatch.host_counts;
    pending_chunks_ = counts.chunks;
  } else {
    double total = 0;
    for (int64_t e = 0; e < E; ++e) total += counts.active[e];
    std::vector<double> shares(E);
    for (int64_t e = 0; e < E; ++e) shares[e] = total > 0 ? counts.active[e] / total : 0.0;
    load = tensor(shares, {E}).to(rdt).to(dev);
    pending_counts_.reset();
    global_tls_ = counts.chunks > 0 ? 1.0 - total / (counts.chunks * double(E)) : -1.0;
    *routed_anywhere = total > 0;
  }
  const double scale = ctx.aux_scale;
  // The normalised router weights: the balance's (composed), the statistics' (recording).
  const auto normalised = [&] { return div(r, add(sum(r, {2}, true), 1e-5)); };
  Tensor q, balance, locality, sparsity, losses;
  if (fused) {  // BLOCKFFN's three losses in three kernels each way (kernels/moe_aux.h)
    MoeAuxOptions o;
    o.chunk_len = c;
    o.group = seq_group_;
    o.alpha = cfg_.activation_alpha();
    o.balance_scale = double(E) / std::max(counts.chunks, 1.0);
    o.locality_scale = counts.locality_terms > 0 ? 1.0 / counts.locality_terms : 0.0;
    o.sparsity_scale = counts.sparsity_terms > 0 ? 1.0 / counts.sparsity_terms : 0.0;
    o.weights[0] = balance_weight_ * scale;
    o.weights[1] = locality_weight_ * scale;
    o.weights[2] = sparsity_coef() * scale;
    const Tensor both = moe_aux(raw, s, r, load, z_next, o);  // [2, 3]: weighted, plain
    losses = both.select(0, 0);                               // AuxLoss order
    const Tensor plain = both.select(0, 1).detach();
    balance = plain.select(0, 0);
    locality = plain.select(0, 1);
    sparsity = plain.select(0, 2);
    last_sparsity_ = sparsity;  // this rank's share of L_CS (the schedule sums them)
    last_grid_ = ctx.grid;
    if (ctx.recording()) q = normalised();
  } else {
    q = normalised();
    locality = zeros({}, rdt, dev);
    sparsity = zeros({}, rdt, dev);
    // balance = E * sum_e mean_q_e * load_e, mean_q over every chunk of the global batch.
    balance = mul(sum(mul(sum(q, {0, 1}), load)), double(E) / std::max(counts.chunks, 1.0));
    if (blockffn_) {  // p = s / (sum s + eps): BlockFFN's activation probabilities
      const Tensor p = div(s, add(sum(s, {2}, true), 1e-5));
      if (counts.locality_terms > 0)
        locality = mul(moe_blockffn_locality_sum(z, z_next, c), 1.0 / counts.locality_terms);
      if (counts.sparsity_terms > 0)
        sparsity = mul(moe_blockffn_sparsity_sum(p, seq_group_, c), 1.0 / counts.sparsity_terms);
      last_sparsity_ = sparsity.detach();  // this rank's share of L_CS (the schedule sums them)
      last_grid_ = ctx.grid;
    } else {
      if (counts.locality_terms > 0)
        locality = mul(moe_locality_sum(z, z_next), 1.0 / counts.locality_terms);
      // The activation probability sigmoid(alpha * s - beta) from the ReLU output s, not the raw
      // logit: a logit already below zero gets no gradient pushing it further down. And each
      // chunk's strongest expert is left out (its logit set to -30: p ~ 1e-13, no gradient): the
      // loss counts the experts beyond the first, so it makes chunks sparser but never empty.
      // From the raw logits it lowered every expert of a layer together until the whole layer
      // sat below zero, where no loss brings it back (docs/MODEL.md).
      // top = 1 where s_e is the chunk's largest (ties within 1e-6 included), else 0.
      const Tensor sd = s.detach();
      const Tensor top = relu(affine(sub(sd, amax(sd, 2, true)), 1e6, 1.0));
      const Tensor zs = affine(s, cfg_.activation_alpha(), -cfg_.activation_beta());
      const Tensor z_sparse = add(mul(zs, affine(top, -1.0, 1.0)), mul(top, -30.0));
      if (counts.sparsity_terms > 0)
        sparsity = mul(moe_sparsity_sum(z_sparse, seq_group_), 1.0 / counts.sparsity_terms);
    }
    losses = concat({mul(balance, balance_weight_ * scale).reshape({1}),  // AuxLoss
                     mul(locality, locality_weight_ * scale).reshape({1}),
                     mul(sparsity, sparsity_coef() * scale).reshape({1})},
                    0);
  }
  if (ctx.recording()) {  // the routing on the host for the statistics (and evaluation's purity)
    MoeRouting routing;
    routing.batch = B;
    routing.num_chunks = nC;
    routing.chunk = c;
    routing.num_experts = E;
    if (!tiled) routing.dropped = dispatch.dropped;
    // Read at the forward's end (ForwardContext::stat_later): the mask, q, s and the three losses;
    // the tiled dispatch's dropped counts from its own pending copy.
    ctx.stat_later(
        {dispatch.mask, q.detach(), s.detach().reshape({B * nC, E}), balance, locality, sparsity},
        [this, routing, pending = tiled ? dispatch.host_counts : nullptr](
            const std::vector<Tensor>& h, ForwardContext& cx) mutable {
          visit_host_values(h[0], [&](const auto* m, int64_t n) {
            routing.active.resize(static_cast<std::size_t>(n));
            for (int64_t i = 0; i < n; ++i) routing.active[i] = m[i] != 0;
          });
          if (pending) {
            const std::vector<int64_t>& host = pending->get();
            routing.dropped.assign(host.begin() + num_experts_, host.end());
          }
          record_stats(routing, h[1], h[2], cx);
          const std::string p = "moe." + std::to_string(layer_) + ".";
          cx.stat(p + "balance_loss", h[3].item<double>());
          cx.stat(p + "locality_loss", h[4].item<double>());
          cx.stat(p + "sparsity_loss", h[5].item<double>());
          resolve_global_tls();
          cx.stat(p + "tls_global", global_tls_);
        });
  }
  return losses;
}

// Routing off: every expert on every token, weight 1/E: the experts act as one dense FFN.
ChunkMoE::Routed ChunkMoE::route_densely(int64_t rows, Device device) const {
  const int64_t E = num_experts_;
  Routed rt;
  std::vector<int64_t> perm, inv(rows * E);
  perm.reserve(E * rows);
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t t = 0; t < rows; ++t) {
      inv[t * E + e] = static_cast<int64_t>(perm.size());
      perm.push_back(t);
    }
    rt.sizes.push_back(rows);
  }
  if (!perm.empty()) {
    rt.perm = tensor(perm, {static_cast<int64_t>(perm.size())}).to(device);
    rt.inv = tensor(inv, {rows, E}).to(device);
  }
  return rt;
}

// The experts on their rows and the weighted combine back into token order: xf [B L, d].
Tensor ChunkMoE::run_routed(const Tensor& xf, const Routed& rt, ForwardContext& ctx) const {
  const int64_t E = num_experts_;
  // With experts sharded the exchange runs on every rank, even one that routed nothing this time;
  // when no rank routed anything the experts do not run at all (as in one process: no expert
  // gradient).
  const bool any_rows = rt.perm.defined() && rt.perm.numel() > 0;
  if (!(local_experts_ != num_experts_ ? rt.routed_anywhere : any_rows))
    return zeros(xf.shape(), xf.dtype(), xf.device());
  // The dispatch and the combine go by the token's own rows (the inverse): no scatter, no sort.
  const Tensor xs = gather_rows(xf, rt.perm, rt.inv);
  Tensor y = rt.tiled.tile > 0 ? run_experts_tiled(xs, rt.tiled) : run_experts(xs, rt.sizes, ctx);
  if (rt.w.defined() && g_fused_combine.load()) {  // weights, products and sum in one op
    return moe_combine(y, rt.w.reshape({rt.w.numel()}), rt.inv, rt.widx.narrow(0, 0, y.size(0)),
                       rt.perm.narrow(0, 0, y.size(0)), E, chunk_);
  }
  if (rt.w.defined()) {
    // Tiled: padding rows name one row past the pairs, whose weight is 0 (kernels/moe_route.h).
    const int64_t pairs = rt.w.numel();
    const Tensor wt =
        rt.tiled.tile > 0
            ? concat({rt.w.reshape({pairs, 1}), zeros({1, 1}, rt.w.dtype(), rt.w.device())}, 0)
            : rt.w.reshape({pairs, 1});
    y = mul(y, gather_rows(wt, rt.widx));
  } else {
    y = mul(y, 1.0 / double(E));
  }
  return gather_sum_rows(y, rt.inv, rt.perm);
}

}  // namespace hydra::model
