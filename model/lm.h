// Language models: the Hydra LM (embedding, tri-path blocks, memories between blocks, final
// RMSNorm, LM head tied to the embedding) and the dense Transformer baseline, behind one interface.
// loss = LM cross-entropy + the weighted auxiliary losses, each reported on its own.
#pragma once

#include <memory>

#include "model/block.h"
#include "model/pkm.h"
#include "model/workspace.h"

namespace hydra::model {

struct LmOutput {
  Tensor loss;     // total, what backward starts from
  Tensor lm_loss;  // cross-entropy over the targets that are not ignore_index
  Tensor aux;      // [kNumAuxLosses] (AuxLoss order): the weighted auxiliary losses
  Tensor logits;   // [B, L, V] when requested
};

class LanguageModel : public Module {
 public:
  static constexpr int64_t kIgnoreIndex = -100;
  // tokens [B, L] (i64); targets [B, L] with kIgnoreIndex where no loss is wanted, or undefined (no
  // loss). Logits are returned when `want_logits`.
  virtual LmOutput forward(const Tensor& tokens, const Tensor& targets, ForwardContext& ctx,
                           bool want_logits = false) = 0;
  // After each optimizer step (adaptive coefficients).
  virtual void after_step() {}
  // Expert parallelism: keep only this ep rank's experts (parallel::ProcessGrid: ep_rank of ep).
  virtual void shard_experts(int64_t rank, int64_t size) {}
  virtual const ModelSpec& spec() const = 0;
  // The routing of each MoE layer in the last forward that recorded statistics, in block order
  // (evaluation's routing purity); none for a model without routed experts.
  virtual std::vector<const MoeRouting*> routings() const { return {}; }
};

class HydraLM : public LanguageModel {
 public:
  HydraLM(const ModelSpec& spec, uint64_t seed);
  LmOutput forward(const Tensor& tokens, const Tensor& targets, ForwardContext& ctx,
                   bool want_logits) override;
  void after_step() override;
  void shard_experts(int64_t rank, int64_t size) override;
  const ModelSpec& spec() const override { return spec_; }
  std::vector<const MoeRouting*> routings() const override;

  Tensor embedding;  // [V, d], also the LM head
  std::shared_ptr<ModuleList> blocks, workspaces, pkms;
  std::shared_ptr<RMSNorm> final_norm;

 private:
  ModelSpec spec_;
  std::vector<int64_t> ws_after_, pkm_after_;
};

class TransformerBlock : public Module {
 public:
  TransformerBlock(Init& init, const ModelSpec& spec);
  Tensor forward(const Tensor& x, int64_t pos0);
  std::shared_ptr<RMSNorm> norm_attn, norm_ffn;
  std::shared_ptr<SparseGlobalAttention> attn;
  std::shared_ptr<SwiGLU> ffn;
};

class TransformerLM : public LanguageModel {
 public:
  TransformerLM(const ModelSpec& spec, uint64_t seed);
  LmOutput forward(const Tensor& tokens, const Tensor& targets, ForwardContext& ctx,
                   bool want_logits) override;
  const ModelSpec& spec() const override { return spec_; }

  Tensor embedding;
  std::shared_ptr<ModuleList> blocks;
  std::shared_ptr<RMSNorm> final_norm;

 private:
  ModelSpec spec_;
};

// The model a spec describes, initialised from `seed` (f32, CPU).
std::unique_ptr<LanguageModel> build_model(const ModelSpec& spec, uint64_t seed);

}  // namespace hydra::model
