// Workspace memory (hydra.md section 5): M slots of width d with a learned initial state S_0. The
// sequence is taken in chunks of `chunk` tokens; tokens of chunk j read S_j (cross-attention,
// queries from tokens, keys/values from slots); then the slots write:
//   update = CrossAttn(S_j -> tokens of chunk j),  a = sigmoid(W_a [S_j ; update])  (per slot)
//   S_{j+1} = (1 - a) * S_j + a * update
// Reading S_j (not S_{j+1}) keeps it causal. The reads of all chunks run as one batched attention.
// The write (workspace.write):
//   SERIAL    update = CrossAttn(queries from S_j -> tokens of chunk j): a chain over chunks of
//   small
//             launches (projection, attention, projection, gate), one link per chunk;
//   PARALLEL  update = CrossAttn(queries from S_0 -> tokens of chunk j): the learned initial slots
//   ask,
//             so every chunk's update is one batched attention up front, and only the gated update
//             (which still sees S_j) is a recurrence: one fused kernel over all chunks
//             (gated_scan).
#pragma once

#include "model/context.h"
#include "model/layers.h"
#include "model/spec.h"

namespace hydra::model {

// Decoding in segments (LanguageModel::decode): the slots entering the chunk in progress and that
// chunk's inputs so far.
struct WorkspaceCarry {
  Tensor slots;    // [B, M, d]; undefined: S_0
  Tensor pending;  // [B, position % chunk, d]; undefined at a chunk boundary
};

class WorkspaceMemory : public Module {
 public:
  WorkspaceMemory(Init& init, const ModelSpec& spec, int64_t index);
  // x [B, L, d] (normalised) -> [B, L, d]. `state` [B, M, d] continues a sequence (undefined: S_0);
  // `next` (optional) receives the slots after the last chunk.
  Tensor forward(const Tensor& x, ForwardContext& ctx, const Tensor& state = Tensor(),
                 Tensor* next = nullptr) const;
  // Decoding: x [B, L, d] (any L) continues the sequence `carry` describes, which it updates; the
  // outputs are forward()'s at the same positions. A chunk's write runs when its last token
  // arrives; each call re-reads the chunk in progress from its start (at most chunk - 1 tokens).
  Tensor forward_carried(const Tensor& x, ForwardContext& ctx, WorkspaceCarry& carry) const;

  // The attentions run as one fused kernel each (heads up to 128 wide, the default) or as explicit
  // GEMMs and a softmax (wider heads); the same function either way. For tests.
  void set_fused_attention(bool on) { fused_attention_ = on; }

  Tensor slots;  // S_0 [M, d]
  std::shared_ptr<Linear> read_q, read_k, read_v, read_o, write_q, write_k, write_v, write_o, gate;

 private:
  // forward() over x of whole chunks whose first `writes` chunks write (the others only read:
  // nC - 1 <= writes <= nC); *next gets the slots after the writes.
  Tensor run(const Tensor& x, ForwardContext& ctx, const Tensor& state, int64_t writes,
             Tensor* next) const;
  // The slot states entering every chunk and after the last, [nC + 1, B, M, d], chunk-major;
  // `x_chunks` is x chunk-major [nC, B, c, d]; `gates` receives the write gates when recording.
  Tensor write_serial(const Tensor& x_chunks, const Tensor& s0, std::vector<Tensor>* gates) const;
  Tensor write_parallel(const Tensor& x_chunks, const Tensor& s0, std::vector<Tensor>* gates) const;

  int64_t index_, num_slots_, chunk_, heads_, dim_;
  bool fused_attention_ = true, parallel_write_ = false;
};

}  // namespace hydra::model
