// A model config resolved into the numbers the layers are built from (zeros replaced by their
// derived defaults, memory placements filled in), after validation. Errors read
//   configs/toy.pbtxt: model.moe.max_active = 9 must be <= num_experts (8)
#pragma once

#include <string>
#include <vector>

#include "base/status.h"
#include "configs/hydra.pb.h"

namespace hydra::model {

struct ModelSpec {
  config::ModelConfig cfg;  // defaults resolved
  bool transformer = false;
  int64_t d = 0, num_blocks = 0, vocab = 0, max_seq_len = 0;
  double norm_eps = 1e-5, init_std = 0.02;

  // SSM
  int64_t d_inner = 0, d_state = 0, conv_width = 0, dt_rank = 0, scan_chunk = 0;
  bool ssd = false;       // ssm.form: SSD
  int64_t ssm_heads = 0;  // SSD: d_inner / head_dim (the decay rates); SELECTIVE: d_inner
  // SGA
  std::vector<bool> has_sga;  // per block
  int64_t sga_heads = 0, sga_window = 0, sga_stride = 0;
  double rope_theta = 10000;
  // MoE
  int64_t num_experts = 0, d_expert = 0, max_active = 0, moe_chunk = 0, d_shared = 0;
  bool shared_expert = false;
  bool gated_experts = true;  // SWIGLU (W1, W3, W2); false: SILU (W1, W2)
  // Workspace memories after these blocks (0-based), and their sizes.
  std::vector<int64_t> ws_after;
  int64_t ws_slots = 0, ws_chunk = 0, ws_heads = 0, ws_dim = 0;
  bool ws_parallel_write = false;  // workspace.write: PARALLEL
  // PKM memories after these blocks.
  std::vector<int64_t> pkm_after;
  int64_t pkm_heads = 0, pkm_k_dim = 0, pkm_n_keys = 0, pkm_topk = 0;
  // Transformer baseline.
  int64_t tf_heads = 0, tf_d_ff = 0;

  int64_t sga_blocks() const;
};

// Validates `cfg` (source: the file name, for messages) and resolves it.
Expected<ModelSpec> make_spec(const config::ModelConfig& cfg, const std::string& source);

}  // namespace hydra::model
