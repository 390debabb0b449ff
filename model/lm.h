// Language models: the Hydra LM (embedding, tri-path blocks, memories between blocks, final
// RMSNorm, LM head tied to the embedding) and the dense Transformer baseline, behind one interface.
// loss = LM cross-entropy + the weighted auxiliary losses, each reported on its own.
#pragma once

#include <memory>
#include <vector>

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

// A batch of sequences being decoded (LanguageModel::decode): the position reached and what each
// layer carries to the next segment. Its size does not grow with the position, except the attention
// caches (allocated once, for `capacity` positions).
struct DecodeState {
  DecodeState(int64_t batch, int64_t capacity) : batch(batch), capacity(capacity) {}
  int64_t batch, capacity;
  int64_t position = 0;
  int64_t kv_split = 1024;         // KvCache::split of the attention caches
  std::vector<BlockCarry> blocks;  // one per block (the Transformer's use kv only)
  std::vector<WorkspaceCarry> workspaces;
};

class LanguageModel : public Module {
 public:
  static constexpr int64_t kIgnoreIndex = -100;
  // tokens [B, L] (i64); targets [B, L] with kIgnoreIndex where no loss is wanted, or undefined (no
  // loss). Logits are returned when `want_logits`.
  virtual LmOutput forward(const Tensor& tokens, const Tensor& targets, ForwardContext& ctx,
                           bool want_logits = false) = 0;
  // Recurrent decoding: tokens [B, L] (any L >= 1) continue the sequences `state` holds, with the
  // paths `paths` switches on; returns the logits of the segment's positions [B, L, V] (or of its
  // last position, [B, 1, V], when `last_only`), equal to forward()'s logits at the same positions
  // of the whole sequence. No gradient; one process.
  virtual Tensor decode(const Tensor& tokens, const PathSwitches& paths, DecodeState& state,
                        bool last_only = false) = 0;
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
  Tensor decode(const Tensor& tokens, const PathSwitches& paths, DecodeState& state,
                bool last_only) override;
  void after_step() override;
  void shard_experts(int64_t rank, int64_t size) override;
  const ModelSpec& spec() const override { return spec_; }
  std::vector<const MoeRouting*> routings() const override;

  Tensor embedding;  // [V, d], also the LM head
  std::shared_ptr<ModuleList> blocks, workspaces, pkms;
  std::shared_ptr<RMSNorm> final_norm;

 private:
  // Embedding to the final norm's input: the blocks and the memories between them. *aux gets the
  // blocks' summed auxiliary losses; carry: decoding.
  Tensor trunk(const Tensor& tokens, ForwardContext& ctx, Tensor* aux, DecodeState* carry);

  ModelSpec spec_;
  std::vector<int64_t> ws_after_, pkm_after_;
};

class TransformerBlock : public Module {
 public:
  TransformerBlock(Init& init, const ModelSpec& spec);
  // kv (decoding): x continues the sequence whose keys and values it holds.
  Tensor forward(const Tensor& x, int64_t pos0, KvCache* kv = nullptr);
  std::shared_ptr<RMSNorm> norm_attn, norm_ffn;
  std::shared_ptr<SparseGlobalAttention> attn;
  std::shared_ptr<SwiGLU> ffn;
};

class TransformerLM : public LanguageModel {
 public:
  TransformerLM(const ModelSpec& spec, uint64_t seed);
  LmOutput forward(const Tensor& tokens, const Tensor& targets, ForwardContext& ctx,
                   bool want_logits) override;
  Tensor decode(const Tensor& tokens, const PathSwitches& paths, DecodeState& state,
                bool last_only) override;
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
