// Parameter and FLOP accounting computed from a spec alone (nothing allocated): the table
// hydra-params prints. Must equal the sizes of the parameters build_model() allocates (a test
// checks it).
#pragma once

#include <string>
#include <vector>

#include "model/context.h"
#include "model/spec.h"

namespace hydra::model {

struct ParamRow {
  std::string component;
  int64_t total = 0;   // parameters
  int64_t active = 0;  // used per token (routed experts: max_active; PKM: the value rows read)
};

struct ParamTable {
  std::vector<ParamRow> rows;  // embedding, ssm, sga, moe, workspace, pkm, norms_gates
  int64_t total = 0, active = 0;
  double forward_flops_per_token = 0;  // at seq_len, matmuls and the scan/attention inner loops
  int64_t seq_len = 0;
};

ParamTable count_parameters(const ModelSpec& spec, int64_t seq_len);

// Refuses, before anything is allocated, a model whose fp32 weights alone cannot fit in the memory
// of one rank even in the most sharded layout (weights / ranks) on the device it trains on (cuda:
// GPU 0's, else the host's): an extra zero in a size gets a message naming the sizes instead of an
// allocation failure. Training needs several times this (gradients, AdamW state, activations);
// those are not guessed here.
Status check_fits_in_memory(const ModelSpec& spec, int64_t ranks, bool cuda,
                            const std::string& source);

// Model FLOPs of one training step per token (forward + backward = 3 x forward, recomputation not
// counted: the usual MFU numerator) with the given paths on: sparse attention, routing (off: every
// expert runs), the memories. The SSM path is always counted.
double training_flops_per_token(const ModelSpec& spec, const PathSwitches& paths, int64_t seq_len);

}  // namespace hydra::model
