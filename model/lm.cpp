#include "model/lm.h"

#include <algorithm>
#include <cmath>
#include <map>

#include "autograd/grad_mode.h"
#include "autograd/node.h"
#include "parallel/collectives.h"

namespace hydra::model {

AuxLosses AuxLosses::read(const Tensor& stacked) {
  const std::vector<double> v = stacked.to_vector<double>();
  HYDRA_CHECK(v.size() == kNumAuxLosses) << "AuxLosses::read: " << v.size() << " values";
  return {v[kAuxBalance], v[kAuxLocality], v[kAuxSparsity]};
}

namespace {
// The MoE layers' BlockFFN sparsity averaged over layers: moe.tls and moe.cls.<L> from the
// per-layer block.<i>.moe.tls and block.<i>.moe.cls.<L> (model/moe.cpp).
void add_moe_means(ForwardContext& ctx) {
  std::map<std::string, std::pair<double, int>> sums;
  for (const auto& [key, value] : ctx.stats) {
    if (key.rfind("block.", 0) != 0) continue;
    const std::size_t at = key.find(".moe.");
    if (at == std::string::npos) continue;
    const std::string tail = key.substr(at + 5);
    if (tail == "tls" || tail.rfind("cls.", 0) == 0) {
      auto& [sum, count] = sums["moe." + tail];
      sum += value;
      ++count;
    }
  }
  for (const auto& [key, sc] : sums) ctx.stat(key, sc.first / double(sc.second));
}
}  // namespace
namespace {

// Runs fn(x) -> {y, aux}, through a checkpoint when ctx.recompute. The recomputation in the
// backward uses a copy of the context (the caller's may be gone by then) and records no statistics.
template <class F>
std::pair<Tensor, Tensor> run_block(ForwardContext& ctx, F fn, const Tensor& x) {
  if (!ctx.recompute) {
    Tensor aux;
    Tensor y = fn(x, ctx, &aux);
    return {y, aux};
  }
  ForwardContext snapshot = ctx;
  snapshot.stats.clear();
  snapshot.pending_stats.clear();
  ForwardContext* live = &ctx;
  const auto outs = checkpoint(
      [fn, snapshot, live](const std::vector<Tensor>& in) mutable {
        ForwardContext& c = is_recomputing() ? snapshot : *live;
        Tensor aux;
        Tensor y = fn(in[0], c, &aux);
        return std::vector<Tensor>{y, aux};
      },
      {x});
  return {outs[0], outs[1]};
}

// The mean over this forward's targets, or (distributed / accumulated steps) this forward's share
// of the mean over the step's targets.
Tensor lm_loss_of(const Tensor& logits, const Tensor& targets, const ForwardContext& ctx) {
  if (ctx.lm_tokens <= 0) return cross_entropy(logits, targets, LanguageModel::kIgnoreIndex);
  return mul(cross_entropy(logits, targets, LanguageModel::kIgnoreIndex, Reduction::kSum),
             1.0 / ctx.lm_tokens);
}

// The loss plus the state-chain tokens (zeros whose backward receives a state's gradient), anchored
// to every collective of this forward so that each rank's backward runs all of them
// (autograd/node.h).
Tensor with_chain_tokens(Tensor loss, const ForwardContext& ctx) {
  for (const Tensor& t : ctx.chain_tokens) loss = add(loss, t.to(loss.dtype()));
  return anchor_collectives(loss, take_collective_outputs());
}

// Checks a decoding segment against its state, sizing the state's carries at its first segment.
void begin_segment(const Tensor& tokens, const ModelSpec& spec, int64_t workspaces,
                   DecodeState& state) {
  HYDRA_CHECK(tokens.dim() == 2 && is_integral(tokens.dtype()) && tokens.size(0) == state.batch &&
              tokens.size(1) >= 1)
      << "decode: tokens must be integer [" << state.batch << ", >= 1], got "
      << shape_str(tokens.shape());
  HYDRA_CHECK(state.capacity <= spec.max_seq_len)
      << "decode: a capacity of " << state.capacity << " positions exceeds model.max_seq_len "
      << spec.max_seq_len;
  HYDRA_CHECK(state.position + tokens.size(1) <= state.capacity)
      << "decode: position " << state.position + tokens.size(1) << " is past the state's capacity "
      << state.capacity;
  if (state.blocks.empty()) {
    state.blocks.resize(spec.num_blocks);
    for (BlockCarry& b : state.blocks) {
      b.kv.capacity = state.capacity;
      b.kv.split = state.kv_split;
    }
    state.workspaces.resize(workspaces);
  }
}

void check_tokens(const Tensor& tokens, const Tensor& targets, const ModelSpec& spec) {
  HYDRA_CHECK(tokens.dim() == 2 && is_integral(tokens.dtype()))
      << "model: tokens must be integer [batch, seq_len], got " << shape_str(tokens.shape());
  HYDRA_CHECK(!targets.defined() || targets.shape() == tokens.shape())
      << "model: targets " << shape_str(targets.shape()) << " do not match tokens "
      << shape_str(tokens.shape());
  HYDRA_CHECK(tokens.size(1) <= spec.max_seq_len)
      << "model: sequence length " << tokens.size(1) << " exceeds model.max_seq_len "
      << spec.max_seq_len;
}

}  // namespace

HydraLM::HydraLM(const ModelSpec& spec, uint64_t seed) : spec_(spec) {
  Init init(seed);
  embedding = register_parameter("embedding", init.normal({spec.vocab, spec.d}, spec.init_std));
  blocks = register_module("blocks", std::make_shared<ModuleList>());
  for (int64_t b = 0; b < spec.num_blocks; ++b)
    blocks->push_back(std::make_shared<HydraBlock>(init, spec, b));
  workspaces = register_module("workspaces", std::make_shared<ModuleList>());
  for (std::size_t i = 0; i < spec.ws_after.size(); ++i)
    workspaces->push_back(
        std::make_shared<MemoryBranch>(spec, std::make_shared<WorkspaceMemory>(init, spec, i)));
  pkms = register_module("pkms", std::make_shared<ModuleList>());
  for (std::size_t i = 0; i < spec.pkm_after.size(); ++i)
    pkms->push_back(
        std::make_shared<MemoryBranch>(spec, std::make_shared<ProductKeyMemory>(init, spec, i)));
  final_norm = register_module("final_norm", std::make_shared<RMSNorm>(spec.d, spec.norm_eps));
  ws_after_ = spec.ws_after;
  pkm_after_ = spec.pkm_after;
}

Tensor HydraLM::trunk(const Tensor& tokens, ForwardContext& ctx, Tensor* aux, DecodeState* carry) {
  Tensor x = hydra::embedding(embedding, tokens);
  Tensor aux_total;  // in the routers' dtype (fp32 under mixed precision)
  for (std::size_t b = 0; b < blocks->size(); ++b) {
    const auto block = blocks->ptr<HydraBlock>(b);
    BlockCarry* bc = carry != nullptr ? &carry->blocks[b] : nullptr;
    auto [y, block_aux] = run_block(
        ctx,
        [block, bc](const Tensor& in, ForwardContext& c, Tensor* a) {
          return block->forward(in, c, a, bc);
        },
        x);
    x = y;
    if (block_aux.defined())
      aux_total = aux_total.defined() ? add(aux_total, block_aux) : block_aux;
    for (std::size_t i = 0; i < ws_after_.size(); ++i) {
      if (ws_after_[i] != static_cast<int64_t>(b) || !ctx.paths.workspace) continue;
      const auto& br = workspaces->at<MemoryBranch>(i);
      const auto& mem = dynamic_cast<WorkspaceMemory&>(*br.memory);
      if (carry != nullptr) {
        x = gated_residual(x, {mem.forward_carried(br.norm->forward(x), ctx, carry->workspaces[i])},
                           {br.gate});
      } else if (ctx.sequence_parallel()) {
        // The slot state is not linear in the tokens: it passes from shard to shard (a serial chain
        // of sp small steps: rank r waits for rank r-1's chunks; the backward mirrors it).
        parallel::Communicator& sp = ctx.grid->sp();
        const Tensor first =
            mem.slots.unsqueeze(0).expand({x.size(0), mem.slots.size(0), mem.slots.size(1)});
        const Tensor s0 = parallel::receive_from_previous(first, sp);
        Tensor s_last;
        const Tensor read = mem.forward(br.norm->forward(x), ctx, s0, &s_last);
        ctx.chain_tokens.push_back(parallel::send_to_next(s_last, sp));
        x = gated_residual(x, {read}, {br.gate});
      } else {
        x = gated_residual(x, {mem.forward(br.norm->forward(x), ctx)}, {br.gate});
      }
    }
    for (std::size_t i = 0; i < pkm_after_.size(); ++i) {
      if (pkm_after_[i] != static_cast<int64_t>(b) || !ctx.paths.pkm) continue;
      const auto& br = pkms->at<MemoryBranch>(i);
      const auto& mem = dynamic_cast<ProductKeyMemory&>(*br.memory);
      x = gated_residual(x, {mem.forward(br.norm->forward(x), ctx)}, {br.gate});
    }
  }
  if (aux != nullptr) *aux = aux_total;
  return x;
}

LmOutput HydraLM::forward(const Tensor& tokens, const Tensor& targets, ForwardContext& ctx,
                          bool want_logits) {
  check_tokens(tokens, targets, spec_);
  (void)take_collective_outputs();  // anything left from a forward that built no loss
  ctx.defer_stats = true;           // the statistics' reads wait for the device once, at the end
  Tensor aux_total;
  const Tensor x = trunk(tokens, ctx, &aux_total, nullptr);
  const Tensor logits = linear(final_norm->forward(x), embedding);  // tied head
  LmOutput out;
  out.aux = aux_total.defined() ? aux_total : zeros({kNumAuxLosses}, x.dtype(), x.device());
  if (targets.defined()) {
    out.lm_loss = lm_loss_of(logits, targets, ctx);
    out.loss = with_chain_tokens(add(out.lm_loss, sum(out.aux).to(out.lm_loss.dtype())), ctx);
  }
  if (want_logits) out.logits = logits;
  ctx.stat_later({out.aux}, [](const std::vector<Tensor>& h, ForwardContext& c) {
    const AuxLosses a = AuxLosses::read(h[0]);
    c.stat("loss.balance", a.balance);
    c.stat("loss.locality", a.locality);
    c.stat("loss.sparsity", a.sparsity);
    add_moe_means(c);  // after every layer's statistics: these run in order
  });
  ctx.finish_stats();  // one wait for the device, at the forward's end
  return out;
}

Tensor HydraLM::decode(const Tensor& tokens, const PathSwitches& paths, DecodeState& state,
                       bool last_only) {
  begin_segment(tokens, spec_, static_cast<int64_t>(ws_after_.size()), state);
  NoGradGuard no_grad;
  ForwardContext ctx;
  ctx.paths = paths;
  ctx.collect_stats = false;
  ctx.pos0 = state.position;
  Tensor x = trunk(tokens, ctx, nullptr, &state);
  state.position += tokens.size(1);
  if (last_only) x = x.narrow(1, x.size(1) - 1, 1);
  return linear(final_norm->forward(x), embedding);
}

void HydraLM::shard_experts(int64_t rank, int64_t size) {
  for (std::size_t b = 0; b < blocks->size(); ++b)
    blocks->at<HydraBlock>(b).moe->shard_experts(rank, size);
}

std::vector<const MoeRouting*> HydraLM::routings() const {
  std::vector<const MoeRouting*> out;
  for (std::size_t b = 0; b < blocks->size(); ++b)
    out.push_back(&blocks->at<HydraBlock>(b).moe->last_routing());
  return out;
}

void HydraLM::after_step() {
  for (std::size_t b = 0; b < blocks->size(); ++b)
    blocks->at<HydraBlock>(b).moe->update_sparsity_coef();
}

}  // namespace hydra::model

namespace hydra::model {

TransformerBlock::TransformerBlock(Init& init, const ModelSpec& spec) {
  const double out_std = spec.init_std / std::sqrt(2.0 * spec.num_blocks);
  norm_attn = register_module("norm_attn", std::make_shared<RMSNorm>(spec.d, spec.norm_eps));
  attn = register_module("attn", std::make_shared<SparseGlobalAttention>(
                                     init, spec.d, spec.tf_heads, AttentionPattern{},
                                     spec.rope_theta, spec.init_std, out_std));
  norm_ffn = register_module("norm_ffn", std::make_shared<RMSNorm>(spec.d, spec.norm_eps));
  ffn = register_module(
      "ffn", std::make_shared<SwiGLU>(init, spec.d, spec.tf_d_ff, spec.init_std, out_std));
}

Tensor TransformerBlock::forward(const Tensor& x, int64_t pos0, KvCache* kv) {
  const Tensor n = norm_attn->forward(x);
  const Tensor h = add(x, kv != nullptr ? attn->forward_cached(n, *kv) : attn->forward(n, pos0));
  return add(h, ffn->forward(norm_ffn->forward(h)));
}

TransformerLM::TransformerLM(const ModelSpec& spec, uint64_t seed) : spec_(spec) {
  Init init(seed);
  embedding = register_parameter("embedding", init.normal({spec.vocab, spec.d}, spec.init_std));
  blocks = register_module("blocks", std::make_shared<ModuleList>());
  for (int64_t b = 0; b < spec.num_blocks; ++b)
    blocks->push_back(std::make_shared<TransformerBlock>(init, spec));
  final_norm = register_module("final_norm", std::make_shared<RMSNorm>(spec.d, spec.norm_eps));
}

LmOutput TransformerLM::forward(const Tensor& tokens, const Tensor& targets, ForwardContext& ctx,
                                bool want_logits) {
  check_tokens(tokens, targets, spec_);
  Tensor x = hydra::embedding(embedding, tokens);
  for (std::size_t b = 0; b < blocks->size(); ++b) {
    const auto block = blocks->ptr<TransformerBlock>(b);
    const int64_t pos0 = ctx.pos0;
    x = run_block(
            ctx,
            [block, pos0](const Tensor& in, ForwardContext& c, Tensor* a) {
              *a = zeros({3}, in.dtype(), in.device());
              return block->forward(in, pos0);
            },
            x)
            .first;
  }
  const Tensor logits = linear(final_norm->forward(x), embedding);
  LmOutput out;
  out.aux = zeros({kNumAuxLosses}, x.dtype(), x.device());
  if (targets.defined()) {
    out.lm_loss = lm_loss_of(logits, targets, ctx);
    out.loss = with_chain_tokens(out.lm_loss, ctx);
  }
  if (want_logits) out.logits = logits;
  return out;
}

Tensor TransformerLM::decode(const Tensor& tokens, const PathSwitches& /*paths*/,
                             DecodeState& state, bool last_only) {
  begin_segment(tokens, spec_, 0, state);
  NoGradGuard no_grad;
  Tensor x = hydra::embedding(embedding, tokens);
  for (std::size_t b = 0; b < blocks->size(); ++b)
    x = blocks->at<TransformerBlock>(b).forward(x, state.position, &state.blocks[b].kv);
  state.position += tokens.size(1);
  if (last_only) x = x.narrow(1, x.size(1) - 1, 1);
  return linear(final_norm->forward(x), embedding);
}

std::unique_ptr<LanguageModel> build_model(const ModelSpec& spec, uint64_t seed) {
  if (spec.transformer) return std::make_unique<TransformerLM>(spec, seed);
  return std::make_unique<HydraLM>(spec, seed);
}

}  // namespace hydra::model
