// Small model specs for tests, built from config text the way users write them.
#pragma once

#include <gtest/gtest.h>

#include <cstdlib>
#include <functional>
#include <string>

#include "configs/config_io.h"
#include "model/lm.h"
#include "model/spec.h"

namespace hydra::testing {

inline model::ModelSpec spec_from(const std::string& model_text) {
  config::RunConfig cfg;
  const Status st = config::parse_text("model { " + model_text + " }", "test", &cfg);
  EXPECT_TRUE(st.ok()) << st.message();
  auto spec = model::make_spec(cfg.model(), "test");
  EXPECT_TRUE(spec.ok()) << spec.status().message();
  return *spec;
}

// Every path and memory on, sizes small enough for float64 gradient checks of the whole model.
inline const char* kMicroModel = R"(
  vocab_size: 11 d_model: 8 num_blocks: 2 max_seq_len: 32
  ssm { d_state: 3 conv_width: 3 scan_chunk: 5 dt_rank: 2 }
  sga { every: 2 num_heads: 2 window: 5 global_stride: 4 }
  moe { num_experts: 3 d_expert: 6 max_active: 2 chunk: 4 shared_expert: true d_shared: 4 }
  workspace { slots: 3 chunk: 8 num_heads: 2 attn_dim: 4 after_block: [0, 1] }
  pkm { num_heads: 2 k_dim: 4 n_keys: 3 topk: 2 after_block: [0] }
)";

// kMicroModel with `ssm_section` (e.g. "ssm { form: SSD head_dim: 4 }") in place of its ssm { ...
// }.
inline std::string micro_text(const std::string& ssm_section) {
  std::string t = kMicroModel;
  const size_t at = t.find("ssm { ");
  t.replace(at, t.find('}', at) + 1 - at, ssm_section);
  return t;
}
// The micro model's SSM in the SSD form (4 heads of 4 channels), and in the paper's form (one
// state per channel, no convolution).
inline const char* kMicroSsd =
    "ssm { form: SSD head_dim: 4 d_state: 3 conv_width: 3 scan_chunk: 5 dt_rank: 2 }";
inline const char* kMicroPaperSsm = "ssm { d_state: 1 conv_width: 0 scan_chunk: 5 dt_rank: 2 }";

inline model::ModelSpec micro_spec(const std::string& extra = "") {
  return spec_from(std::string(kMicroModel) + extra);
}

// The shipped config file's model section; `edit` (optional) changes it before it is resolved.
inline model::ModelSpec shipped_spec(
    const std::string& name, const std::function<void(config::ModelConfig*)>& edit = nullptr) {
  // HYDRA_SOURCE_DIR in the environment overrides the build's (tests run from a copy on another
  // machine).
  const char* env = std::getenv("HYDRA_SOURCE_DIR");
  const std::string path =
      std::string(env != nullptr ? env : HYDRA_SOURCE_DIR) + "/configs/" + name + ".pbtxt";
  auto cfg = config::load_run_config(path);
  EXPECT_TRUE(cfg.ok()) << cfg.status().message();
  if (edit) edit(cfg->mutable_model());
  auto spec = model::make_spec(cfg->model(), path);
  EXPECT_TRUE(spec.ok()) << spec.status().message();
  return *spec;
}

inline Tensor random_tokens(int64_t vocab, int64_t batch, int64_t len, uint64_t seed) {
  Generator g(seed);
  return randint(0, vocab, {batch, len}, g);
}

}  // namespace hydra::testing
