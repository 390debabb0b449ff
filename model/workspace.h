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

class WorkspaceMemory : public Module {
 public:
  WorkspaceMemory(Init& init, const ModelSpec& spec, int64_t index);
  // x [B, L, d] (normalised) -> [B, L, d]. `state` [B, M, d] continues a sequence (undefined: S_0);
  // `next` (optional) receives the slots after the last chunk.
  Tensor forward(const Tensor& x, ForwardContext& ctx, const Tensor& state = Tensor(),
                 Tensor* next = nullptr) const;

  // The attentions run as one fused kernel each (heads up to 128 wide, the default) or as explicit
  // GEMMs and a softmax (wider heads); the same function either way. For tests.
  void set_fused_attention(bool on) { fused_attention_ = on; }

  Tensor slots;  // S_0 [M, d]
  std::shared_ptr<Linear> read_q, read_k, read_v, read_o, write_q, write_k, write_v, write_o, gate;

 private:
  // The slot states entering every chunk and after the last, [nC + 1, B, M, d], chunk-major;
  // `x_chunks` is x chunk-major [nC, B, c, d]; `gates` receives the write gates when recording.
  Tensor write_serial(const Tensor& x_chunks, const Tensor& s0, std::vector<Tensor>* gates) const;
  Tensor write_parallel(const Tensor& x_chunks, const Tensor& s0, std::vector<Tensor>* gates) const;

  int64_t index_, num_slots_, chunk_, heads_, dim_;
  bool fused_attention_ = true, parallel_write_ = false;
};

}  // namespace hydra::model
