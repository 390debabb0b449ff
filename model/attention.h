// Sparse global attention (hydra.md section 3): fused qkv projection, RoPE on q and k, the tiled
// window + global-token causal attention op, output projection. Also the dense causal attention of
// the Transformer baseline (pattern {0, 0}).
#pragma once

#include "model/context.h"
#include "model/layers.h"
#include "parallel/communicator.h"

namespace hydra::model {

class SparseGlobalAttention : public Module {
 public:
  SparseGlobalAttention(Init& init, int64_t d, int64_t heads, AttentionPattern pattern,
                        double rope_theta, double init_std, double out_std);
  // x [B, L, d] -> [B, L, d]; tokens sit at positions pos0 + t.
  // sp (sequence parallelism): x is the shard at positions pos0...; keys of earlier shards are
  // exchanged (parallel::sparse_attention).
  Tensor forward(const Tensor& x, int64_t pos0 = 0, parallel::Communicator* sp = nullptr) const;

  std::shared_ptr<Linear> qkv, out;
  const AttentionPattern& pattern() const { return pattern_; }

 private:
  int64_t heads_, head_dim_;
  AttentionPattern pattern_;
  double rope_theta_;
};

}  // namespace hydra::model
