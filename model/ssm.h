// The Mamba mixer (hydra.md section 2). forward() accepts and returns the recurrent state (the
// conv's last inputs and the scan state) so a sequence can be processed in segments or across
// ranks.
#pragma once

#include "model/context.h"
#include "model/layers.h"
#include "model/spec.h"
#include "parallel/communicator.h"

namespace hydra::model {

struct SsmState {
  Tensor conv;  // [B, W-1, d_inner]: the last W-1 conv inputs
  Tensor ssm;   // [B, d_inner, N], accumulate dtype
};

class SsmMixer : public Module {
 public:
  SsmMixer(Init& init, const ModelSpec& spec);
  // x [B, L, d] -> [B, L, d]. `state` (may be empty) is where the sequence resumes; `next`
  // (optional) receives the state after the last token. sp (sequence parallelism): x is this rank's
  // shard of the sequence; the conv's halo and the scan's initial state come from the previous
  // shards (parallel/sequence.h). `state` is then ignored.
  Tensor forward(const Tensor& x, const SsmState& state = {}, SsmState* next = nullptr,
                 parallel::Communicator* sp = nullptr) const;

  std::shared_ptr<Linear> in_proj, x_proj, dt_proj, out_proj;
  Tensor conv_weight, conv_bias, A_log, D;

 private:
  int64_t d_inner_, d_state_, dt_rank_, conv_width_, scan_chunk_;
  bool ssd_;  // ssm.form: SSD (ssd_scan; A_log and dt_proj per head)
};

}  // namespace hydra::model
