// The tri-path block (hydra.md section 1):
//   y = x + g1 * c1 * SSM(N1 x) + g2 * c2 * SGA(N2 x) + g3 * c3 * MoE(N3 x)
// g* are per-channel LayerScale gates; c = softmax(W_c N(x)) * (number of paths on) is the optional
// per-token controller (uniform c is the identity). SGA exists in every sga.every-th block.
#pragma once

#include "model/attention.h"
#include "model/moe.h"
#include "model/ssm.h"

namespace hydra::model {

// What a block carries from one decoding segment to the next (LanguageModel::decode).
struct BlockCarry {
  SsmState ssm;
  KvCache kv;  // blocks with SGA
  MoeCarry moe;
};

class HydraBlock : public Module {
 public:
  HydraBlock(Init& init, const ModelSpec& spec, int64_t index);
  // x [B, L, d] -> y; *aux gets the block's weighted MoE losses (AuxLoss order). carry
  // (decoding): x continues the sequence it describes, and it is updated; no auxiliary losses.
  Tensor forward(const Tensor& x, ForwardContext& ctx, Tensor* aux, BlockCarry* carry = nullptr);

  std::shared_ptr<RMSNorm> norm_ssm, norm_sga, norm_moe, norm_ctrl;
  std::shared_ptr<SsmMixer> ssm;
  std::shared_ptr<SparseGlobalAttention> sga;  // null in blocks without SGA
  std::shared_ptr<ChunkMoE> moe;
  Tensor gate_ssm, gate_sga, gate_moe;
  std::shared_ptr<Linear> ctrl;  // [paths, d], null when the controller is off

 private:
  int64_t index_;
};

// The block's norms of its input (one per path on and the controller's) as one op (rms_norm_multi,
// the default) or one rms_norm each (the reference, in tests; the same mathematics).
// Process-wide.
void set_fused_block_norms(bool on);

// A memory as a residual branch: x + g * memory(N(x)).
class MemoryBranch : public Module {
 public:
  MemoryBranch(const ModelSpec& spec, std::shared_ptr<Module> memory);
  std::shared_ptr<RMSNorm> norm;
  Tensor gate;
  std::shared_ptr<Module> memory;
};

}  // namespace hydra::model
