#include "model/params.h"

#include <unistd.h>

#include <algorithm>
#include <sstream>

#include "autograd/cuda_context.h"

namespace hydra::model {
namespace {

// Mean number of keys a query sees under the sparse pattern, over positions 0..L-1.
double mean_visible_keys(int64_t L, int64_t window, int64_t stride) {
  double total = 0;
  for (int64_t t = 0; t < L; ++t) {
    const bool global_query = stride > 0 && t % stride == 0;
    if (window <= 0 || global_query || t + 1 <= window) {
      total += double(t + 1);
      continue;
    }
    const int64_t band_start = t - window + 1;  // keys in the window
    int64_t globals = 0;                        // global keys before the window
    if (stride > 0) globals = (band_start - 1) / stride + 1;
    total += double(window + globals);
  }
  return L > 0 ? total / double(L) : 0.0;
}

}  // namespace

ParamTable count_parameters(const ModelSpec& s, int64_t seq_len) {
  ParamTable t;
  t.seq_len = seq_len;
  const int64_t d = s.d, V = s.vocab;
  ParamRow emb{"embedding", V * d, V * d};
  double flops = 2.0 * double(V) * double(d);  // tied LM head
  if (s.transformer) {
    const int64_t attn = 4 * d * d, ffn = 3 * d * s.tf_d_ff;
    ParamRow a{"attention", attn * s.num_blocks, attn * s.num_blocks};
    ParamRow f{"ffn", ffn * s.num_blocks, ffn * s.num_blocks};
    ParamRow n{"norms_gates", (2 * s.num_blocks + 1) * d, (2 * s.num_blocks + 1) * d};
    t.rows = {emb, a, f, n};
    flops +=
        double(s.num_blocks) * (2.0 * (attn + ffn) + 4.0 * d * mean_visible_keys(seq_len, 0, 0));
  } else {
    const int64_t di = s.d_inner, N = s.d_state, R = s.dt_rank, W = s.conv_width;
    // rates: the decay rates and deltas (per channel, or per head in the SSD form).
    const int64_t rates = s.ssm_heads;
    const int64_t ssm_linear = 2 * di * d + (R + 2 * N) * di + rates * R + d * di;
    const int64_t conv = W > 0 ? di * W + di : 0;  // weights and bias
    const int64_t ssm = ssm_linear + conv + rates + (s.ssd ? rates : di * N) + di;
    ParamRow ssm_row{"ssm", ssm * s.num_blocks, ssm * s.num_blocks};
    // The scan per token: the recurrence's 9 operations per state (SELECTIVE); the SSD's matrix
    // products as computed (C B^T and the decay-weighted mix over a chunk of Q steps, the chunk
    // state and its read-out).
    const double Q = double(std::min<int64_t>(s.scan_chunk, std::max<int64_t>(seq_len, 1)));
    const double scan = s.ssd ? 2.0 * Q * N + 2.0 * Q * di + 4.0 * N * di : 9.0 * di * N;
    flops += double(s.num_blocks) * (2.0 * ssm_linear + 2.0 * di * W + scan);

    const int64_t sga = 4 * d * d;
    ParamRow sga_row{"sga", sga * s.sga_blocks(), sga * s.sga_blocks()};
    flops += double(s.sga_blocks()) *
             (2.0 * sga + 4.0 * d * mean_visible_keys(seq_len, s.sga_window, s.sga_stride));

    const int64_t E = s.num_experts, expert = (s.gated_experts ? 3 : 2) * s.d_expert * d,
                  shared = s.shared_expert ? 3 * s.d_shared * d : 0;
    const int64_t router = E * d + E;
    ParamRow moe_row{"moe", (router + E * expert + shared) * s.num_blocks,
                     (router + s.max_active * expert + shared) * s.num_blocks};
    flops += double(s.num_blocks) *
             (2.0 * E * d / double(s.moe_chunk) + 2.0 * (s.max_active * expert + shared));

    const int64_t a = s.ws_dim, M = s.ws_slots, nws = static_cast<int64_t>(s.ws_after.size());
    const int64_t ws = M * d + 8 * a * d + 2 * d + 1;
    ParamRow ws_row{"workspace", ws * nws, ws * nws};
    // per token: read_q, write_k, write_v, read_o; both attentions against M slots; the per-chunk
    // slot projections spread over the chunk's tokens.
    flops += double(nws) *
             (8.0 * a * d + 8.0 * a * M + 2.0 * M * (6.0 * a * d + 2.0 * d) / double(s.ws_chunk));

    const int64_t H = s.pkm_heads, kd = s.pkm_k_dim, n = s.pkm_n_keys,
                  np = static_cast<int64_t>(s.pkm_after.size());
    const int64_t pkm_fixed = H * kd * d + kd + H * n * kd;
    ParamRow pkm_row{"pkm", (pkm_fixed + n * n * d) * np, (pkm_fixed + H * s.pkm_topk * d) * np};
    flops += double(np) * (2.0 * H * kd * d + 2.0 * H * n * kd + 2.0 * H * s.pkm_topk * d);

    // Per block: norms and LayerScale gates of its paths, the controller; memory branches; final
    // norm.
    int64_t norms = d;
    for (int64_t b = 0; b < s.num_blocks; ++b) {
      const int64_t paths = s.has_sga[b] ? 3 : 2;
      norms += 2 * d * paths;
      if (s.cfg.block().controller()) norms += d + paths * d;
    }
    norms += 2 * d * (nws + np);
    ParamRow norm_row{"norms_gates", norms, norms};
    t.rows = {emb, ssm_row, sga_row, moe_row, ws_row, pkm_row, norm_row};
  }
  for (const ParamRow& r : t.rows) {
    t.total += r.total;
    t.active += r.active;
  }
  t.forward_flops_per_token = flops;
  return t;
}

double training_flops_per_token(const ModelSpec& spec, const PathSwitches& paths, int64_t seq_len) {
  ModelSpec s = spec;
  if (!s.transformer) {
    if (!paths.sga) s.has_sga.assign(s.has_sga.size(), false);
    if (!paths.moe_routing) s.max_active = s.num_experts;
    if (!paths.workspace) s.ws_after.clear();
    if (!paths.pkm) s.pkm_after.clear();
  }
  return 3.0 * count_parameters(s, seq_len).forward_flops_per_token;
}

Status check_fits_in_memory(const ModelSpec& spec, int64_t ranks_in, bool cuda,
                            const std::string& source) {
  const double ranks = double(std::max<int64_t>(1, ranks_in));
  const double params = double(count_parameters(spec, spec.max_seq_len).total);
  const double need = params * 4.0 / ranks;
  double have = 0;
  if (cuda) {
    if (cuda_available()) have = double(cuda_total_memory(0));
  } else {
    have = double(::sysconf(_SC_PHYS_PAGES)) * double(::sysconf(_SC_PAGE_SIZE));
  }
  if (have <= 0 || need <= have) return ok_status();
  std::ostringstream os;
  os.precision(3);
  os << source << ": the model has " << params / 1e9 << "B parameters: " << need / double(1 << 30)
     << " GiB of fp32 weights per rank over " << ranks << " rank(s), more than the "
     << have / double(1 << 30) << " GiB of " << (cuda ? "GPU" : "host")
     << " memory (model.d_model = " << spec.d << ", num_blocks = " << spec.num_blocks
     << ", vocab_size = " << spec.vocab << "); check the model's sizes";
  return invalid_argument(os.str());
}

}  // namespace hydra::model
