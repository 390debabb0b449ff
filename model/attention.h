// Sparse global attention (hydra.md section 3): fused qkv projection, RoPE on q and k, the tiled
// window + global-token causal attention op, output projection. Also the dense causal attention of
// the Transformer baseline (pattern {0, 0}).
#pragma once

#include <array>

#include "model/context.h"
#include "model/layers.h"
#include "parallel/communicator.h"

namespace hydra::model {

// Decoding in segments (LanguageModel::decode): the keys and values of every earlier position, as
// a global token's query sees them all. [B, capacity, H, dh], positions [0, len) filled; allocated
// at the first segment in the activations' dtype.
struct KvCache {
  Tensor k, v;
  int64_t len = 0, capacity = 0;
  // Dense causal attention of one query over more keys than this: the keys in parts of `split`,
  // each part a batch row of one launch, merged by their log-sum-exps (the attention kernel gives
  // a (sequence, head) one block, which would walk every key alone).
  int64_t split = 1024;
};

class SparseGlobalAttention : public Module {
 public:
  SparseGlobalAttention(Init& init, int64_t d, int64_t heads, AttentionPattern pattern,
                        double rope_theta, double init_std, double out_std);
  // x [B, L, d] -> [B, L, d]; tokens sit at positions pos0 + t.
  // sp (sequence parallelism): x is the shard at positions pos0...; keys of earlier shards are
  // exchanged (parallel::sparse_attention).
  Tensor forward(const Tensor& x, int64_t pos0 = 0, parallel::Communicator* sp = nullptr) const;
  // Decoding: x [B, L, d] at positions cache.len...; its keys and values join the cache and its
  // queries attend over the cache (what forward() computes at those positions).
  Tensor forward_cached(const Tensor& x, KvCache& cache) const;

  std::shared_ptr<Linear> qkv, out;
  const AttentionPattern& pattern() const { return pattern_; }

 private:
  // q, k (RoPE at positions pos0...) and v of x [B, L, d], each [B, L, H, dh].
  std::array<Tensor, 3> project(const Tensor& x, int64_t pos0) const;

  int64_t heads_, head_dim_;
  AttentionPattern pattern_;
  double rope_theta_;
};

}  // namespace hydra::model
