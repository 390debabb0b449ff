// The MoE's auxiliary losses by name (see AuxLosses below), shared by the MoE layer that makes
// them, the blocks and LMs that add them up, and the trainer that logs them.
#pragma once

#include <cstdint>

#include "autograd/tensor.h"

namespace hydra::model {

// The MoE's weighted auxiliary losses (summed over the blocks). On the device they travel stacked
// in one tensor of kNumAuxLosses (LmOutput::aux, ChunkMoE::forward), so that each block adds its
// own with one op and the step reads them with one copy; on the host they go by name.
enum AuxLoss : int64_t { kAuxBalance = 0, kAuxLocality = 1, kAuxSparsity = 2, kNumAuxLosses = 3 };
struct AuxLosses {
  double balance = 0, locality = 0, sparsity = 0;
  static AuxLosses read(const Tensor& stacked);  // [kNumAuxLosses], one copy to the host
  AuxLosses& operator+=(const AuxLosses& o) {
    balance += o.balance;
    locality += o.locality;
    sparsity += o.sparsity;
    return *this;
  }
};

}  // namespace hydra::model
