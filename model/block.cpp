#include "model/block.h"

#include <atomic>
#include <cmath>

namespace hydra::model {

namespace {
Tensor layer_scale(int64_t d, double value) { return full({d}, value); }
const ParamOptions kGate{.weight_decay = false};
std::atomic<bool> g_fused_norms{true};  // set_fused_block_norms

// norms[i](x) for each i: one rms_norm_multi when fused and the norms share their epsilon.
std::vector<Tensor> normalise(const Tensor& x, const std::vector<const RMSNorm*>& norms) {
  bool fused = g_fused_norms.load() && norms.size() > 1;
  std::vector<Tensor> weights;
  for (const RMSNorm* n : norms) {
    fused = fused && n->eps() == norms[0]->eps();
    weights.push_back(n->weight);
  }
  if (fused) return rms_norm_multi(x, weights, norms[0]->eps());
  std::vector<Tensor> out;
  out.reserve(norms.size());
  for (const RMSNorm* n : norms) out.push_back(n->forward(x));
  return out;
}
}  // namespace

void set_fused_block_norms(bool on) { g_fused_norms.store(on); }

HydraBlock::HydraBlock(Init& init, const ModelSpec& spec, int64_t index) : index_(index) {
  const int64_t d = spec.d;
  const auto& bc = spec.cfg.block();
  norm_ssm = register_module("norm_ssm", std::make_shared<RMSNorm>(d, spec.norm_eps));
  ssm = register_module("ssm", std::make_shared<SsmMixer>(init, spec));
  gate_ssm = register_parameter("gate_ssm", layer_scale(d, bc.ssm_gate_init()), kGate);
  if (spec.has_sga[index]) {
    norm_sga = register_module("norm_sga", std::make_shared<RMSNorm>(d, spec.norm_eps));
    sga = register_module(
        "sga",
        std::make_shared<SparseGlobalAttention>(
            init, d, spec.sga_heads, AttentionPattern{spec.sga_window, spec.sga_stride},
            spec.rope_theta, spec.init_std, spec.init_std / std::sqrt(2.0 * spec.num_blocks)));
    gate_sga = register_parameter("gate_sga", layer_scale(d, bc.sga_gate_init()), kGate);
  }
  norm_moe = register_module("norm_moe", std::make_shared<RMSNorm>(d, spec.norm_eps));
  moe = register_module("moe", std::make_shared<ChunkMoE>(init, spec, index));
  gate_moe = register_parameter("gate_moe", layer_scale(d, bc.moe_gate_init()), kGate);
  if (bc.controller()) {
    norm_ctrl = register_module("norm_ctrl", std::make_shared<RMSNorm>(d, spec.norm_eps));
    const int64_t paths = sga ? 3 : 2;
    ctrl = register_module("ctrl", std::make_shared<Linear>(init, d, paths, spec.init_std));
  }
}

Tensor HydraBlock::forward(const Tensor& x, ForwardContext& ctx, Tensor* aux, BlockCarry* carry) {
  struct Path {
    const char* name;
    Tensor out, gate;
    int64_t column;  // in the controller's logits
  };
  std::vector<Path> paths;
  parallel::Communicator* sp = ctx.sequence_parallel() ? &ctx.grid->sp() : nullptr;
  // The norms of x the block's paths and controller read, together.
  const bool ssm_on = ctx.paths.ssm, sga_on = sga && ctx.paths.sga;
  std::vector<const RMSNorm*> norms;
  if (ssm_on) norms.push_back(norm_ssm.get());
  if (sga_on) norms.push_back(norm_sga.get());
  norms.push_back(norm_moe.get());
  if (ctrl) norms.push_back(norm_ctrl.get());
  const std::vector<Tensor> normed = normalise(x, norms);
  std::size_t next_norm = 0;
  if (ssm_on) {
    const SsmState state = carry != nullptr ? carry->ssm : SsmState();
    paths.push_back(
        {"ssm",
         ssm->forward(normed[next_norm++], state, carry != nullptr ? &carry->ssm : nullptr, sp),
         gate_ssm, 0});
  }
  if (sga_on) {
    const Tensor& n = normed[next_norm++];
    paths.push_back(
        {"sga",
         carry != nullptr ? sga->forward_cached(n, carry->kv) : sga->forward(n, ctx.pos0, sp),
         gate_sga, 1});
  }
  Tensor moe_aux;
  const Tensor& n = normed[next_norm++];
  paths.push_back(
      {"moe",
       carry != nullptr ? moe->forward_carried(n, ctx, carry->moe) : moe->forward(n, ctx, &moe_aux),
       gate_moe, sga ? 2 : 1});
  if (aux != nullptr) *aux = moe_aux;

  Tensor mix;  // [B, L, paths], or undefined without a controller
  if (ctrl) {
    const Tensor logits = ctrl->forward(normed[next_norm]);  // [B, L, all paths]
    bool all_on = static_cast<int64_t>(paths.size()) == logits.size(2);
    for (std::size_t i = 0; i < paths.size(); ++i) all_on = all_on && paths[i].column == int64_t(i);
    if (all_on) {  // every path of the block: the logits as they are (no split and concat)
      mix = mul(softmax(logits), double(paths.size()));
    } else {  // a curriculum stage with paths off: their columns left out
      std::vector<int64_t> ones(logits.size(2), 1);
      const auto columns = split(logits, ones, 2);
      std::vector<Tensor> on;
      on.reserve(paths.size());
      for (const Path& p : paths) on.push_back(columns[p.column]);
      mix = mul(softmax(concat(on, 2)), double(paths.size()));
    }
  }
  std::vector<Tensor> outs, gates;
  for (const Path& p : paths) {
    outs.push_back(p.out);
    gates.push_back(p.gate);
  }
  Tensor y = gated_residual(x, outs, gates, mix);  // x + sum of out * gate (* mix)
  if (ctx.recording()) {
    const std::string p = "block." + std::to_string(index_) + ".";
    const auto columns = mix.defined() ? split(mix, std::vector<int64_t>(paths.size(), 1), 2)
                                       : std::vector<Tensor>();
    for (std::size_t i = 0; i < paths.size(); ++i) {
      std::vector<Tensor> values = {sum_squares(paths[i].gate)};
      if (!columns.empty()) values.push_back(mean(columns[i]));
      ctx.stat_later(values,
                     [key = p + "gate_norm." + paths[i].name, mix = p + "mix." + paths[i].name](
                         const std::vector<Tensor>& h, ForwardContext& c) {
                       c.stat(key, std::sqrt(h[0].item<double>()));
                       if (h.size() > 1) c.stat(mix, h[1].item<double>());
                     });
    }
  }
  return y;
}

MemoryBranch::MemoryBranch(const ModelSpec& spec, std::shared_ptr<Module> mem) {
  norm = register_module("norm", std::make_shared<RMSNorm>(spec.d, spec.norm_eps));
  gate =
      register_parameter("gate", layer_scale(spec.d, spec.cfg.block().memory_gate_init()), kGate);
  memory = register_module("memory", std::move(mem));
}

}  // namespace hydra::model
