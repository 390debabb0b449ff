#include "model/spec.h"

#include <algorithm>
#include <cmath>
#include <sstream>

#include "configs/config_io.h"

namespace hydra::model {
namespace {

// Collects the first violation as "source: model.<path> = <value> <requirement>".
constexpr int64_t kMaxVocab = int64_t{1} << 24, kMaxWidth = int64_t{1} << 16, kMaxBlocks = 4096,
                  kMaxSeqLen = int64_t{1} << 24, kMaxExperts = 1024, kMaxInner = int64_t{1} << 18,
                  kMaxKeys = int64_t{1} << 16;

class Checker {
 public:
  explicit Checker(std::string source) : source_(std::move(source)) {}
  template <class V>
  void require(bool ok, const std::string& path, V value, const std::string& requirement) {
    if (ok || !status_.ok()) return;
    std::ostringstream os;
    os << source_ << ": model." << path << " = " << value << " " << requirement;
    status_ = invalid_argument(os.str());
  }
  const Status& status() const { return status_; }

 private:
  std::string source_;
  Status status_;
};

std::string list_str(const std::vector<int64_t>& v) {
  std::ostringstream os;
  os << "[";
  for (std::size_t i = 0; i < v.size(); ++i) os << (i ? ", " : "") << v[i];
  os << "]";
  return os.str();
}

// The Transformer baseline: heads, FFN width, RoPE.
void transformer_part(const config::ModelConfig& c, Checker& ck, ModelSpec& s) {
  const auto& t = c.transformer();
  s.tf_heads = t.num_heads() > 0 ? t.num_heads() : std::max<int64_t>(1, s.d / 64);
  s.tf_d_ff = t.d_ff() > 0 ? t.d_ff() : std::max<int64_t>(64, (s.d * 8 / 3 + 63) / 64 * 64);
  s.rope_theta = t.rope_theta();
  ck.require(s.d % s.tf_heads == 0, "transformer.num_heads", s.tf_heads,
             "must divide d_model (" + std::to_string(s.d) + ")");
  ck.require(s.tf_heads > 0 && (s.d / s.tf_heads) % 2 == 0, "transformer.num_heads", s.tf_heads,
             "must leave an even head dimension for RoPE");
  ck.require(t.d_ff() >= 0 && t.d_ff() <= kMaxInner, "transformer.d_ff", t.d_ff(),
             "must be in [0, " + std::to_string(kMaxInner) + "] (0: 8/3 d_model)");
}

// The SSM mixer: widths, states, the convolution, deltas, the scan form.
void ssm_part(const config::ModelConfig& c, Checker& ck, ModelSpec& s) {
  const auto& ssm = c.ssm();
  s.d_inner = ssm.expand() * s.d;
  s.d_state = ssm.d_state();
  s.conv_width = ssm.conv_width();
  s.dt_rank = ssm.dt_rank() > 0 ? ssm.dt_rank() : (s.d + 15) / 16;
  s.scan_chunk = ssm.scan_chunk();
  ck.require(ssm.expand() >= 1 && ssm.expand() <= 64, "ssm.expand", ssm.expand(),
             "must be in [1, 64]");
  ck.require(s.d_state >= 1 && s.d_state <= 1024, "ssm.d_state", s.d_state, "must be in [1, 1024]");
  ck.require(ssm.dt_rank() <= kMaxWidth, "ssm.dt_rank", ssm.dt_rank(),
             "must be <= " + std::to_string(kMaxWidth));
  ck.require(s.conv_width >= 0, "ssm.conv_width", s.conv_width, "must be >= 0 (0: no convolution)");
  ck.require(s.conv_width <= s.max_seq_len, "ssm.conv_width", s.conv_width,
             "must be <= max_seq_len (" + std::to_string(s.max_seq_len) +
                 "): a causal convolution no wider than the longest sequence");
  ck.require(ssm.dt_rank() >= 0, "ssm.dt_rank", ssm.dt_rank(),
             "must be >= 0 (0: ceil(d_model / 16))");
  ck.require(ssm.dt_min() > 0, "ssm.dt_min", ssm.dt_min(), "must be > 0");
  ck.require(ssm.dt_max() >= ssm.dt_min(), "ssm.dt_max", ssm.dt_max(),
             "must be >= dt_min (" + std::to_string(ssm.dt_min()) + ")");
  ck.require(ssm.dt_init_floor() > 0, "ssm.dt_init_floor", ssm.dt_init_floor(), "must be > 0");
  ck.require(s.scan_chunk >= 1 && s.scan_chunk <= kMaxSeqLen, "ssm.scan_chunk", s.scan_chunk,
             "must be in [1, " + std::to_string(kMaxSeqLen) +
                 "]: the steps between the states the backward keeps (one chunk when longer "
                 "than the sequence)");
  s.ssd = ssm.form() == config::SsmConfig::SSD;
  s.ssm_heads = s.d_inner;
  if (s.ssd) {
    ck.require(ssm.head_dim() >= 1 && s.d_inner % ssm.head_dim() == 0, "ssm.head_dim",
               ssm.head_dim(),
               "must divide d_inner (" + std::to_string(s.d_inner) +
                   " = expand * d_model) for the SSD form");
    if (ssm.head_dim() >= 1) s.ssm_heads = s.d_inner / ssm.head_dim();
  }
}

// The sparse global attention: which blocks, heads, window and global stride.
void sga_part(const config::ModelConfig& c, Checker& ck, ModelSpec& s) {
  const auto& sga = c.sga();
  ck.require(sga.every() >= 1, "sga.every", sga.every(), "must be >= 1");
  s.has_sga.assign(s.num_blocks, false);
  if (sga.every() >= 1)
    for (int64_t b = 0; b < s.num_blocks; ++b) s.has_sga[b] = (b + 1) % sga.every() == 0;
  s.sga_heads = sga.num_heads() > 0 ? sga.num_heads() : std::max<int64_t>(1, s.d / 64);
  const bool dense = sga.pattern() == config::SgaConfig::DENSE;
  s.sga_window = dense ? 0 : sga.window();
  // global_stride 0: the first token alone stays global (hydra.md section 3), as a stride no later
  // position reaches.
  s.sga_stride = dense ? 0 : sga.global_stride() > 0 ? sga.global_stride() : s.max_seq_len;
  s.rope_theta = sga.rope_theta();
  ck.require(sga.num_heads() >= 0, "sga.num_heads", sga.num_heads(), "must be >= 0");
  ck.require(s.d % s.sga_heads == 0, "sga.num_heads", s.sga_heads,
             "must divide d_model (" + std::to_string(s.d) + ")");
  ck.require((s.d / s.sga_heads) % 2 == 0, "sga.num_heads", s.sga_heads,
             "must leave an even head dimension for RoPE");
  ck.require(dense || sga.window() >= 1, "sga.window", sga.window(), "must be >= 1");
  ck.require(sga.global_stride() >= 0, "sga.global_stride", sga.global_stride(),
             "must be >= 0 (0: only the first token is global)");
  ck.require(sga.rope_theta() > 0, "sga.rope_theta", sga.rope_theta(), "must be > 0");
}

// The chunk-level MoE: experts, routing, the auxiliary objectives.
void moe_part(const config::ModelConfig& c, Checker& ck, ModelSpec& s) {
  const auto& moe = c.moe();
  s.num_experts = moe.num_experts();
  s.d_expert = moe.d_expert() > 0 ? moe.d_expert() : 2 * s.d;
  s.max_active = moe.max_active();
  s.moe_chunk = moe.chunk();
  s.shared_expert = moe.shared_expert();
  s.gated_experts = moe.expert() == config::MoeConfig::SWIGLU;
  s.d_shared = moe.d_shared() > 0 ? moe.d_shared() : s.d_expert;
  ck.require(s.num_experts >= 1, "moe.num_experts", s.num_experts, "must be >= 1");
  ck.require(moe.blockffn_period() >= 1, "moe.blockffn_period", moe.blockffn_period(),
             "must be >= 1 (optimizer steps)");
  ck.require(moe.blockffn_cap() >= 1, "moe.blockffn_cap", moe.blockffn_cap(),
             "must be >= 1 (the coefficient's largest multiple of its start)");
  ck.require(moe.dispatch_tile() >= 1 && moe.dispatch_tile() <= 65536, "moe.dispatch_tile",
             moe.dispatch_tile(), "must be in [1, 65536]");
  ck.require(s.max_active >= 1, "moe.max_active", s.max_active, "must be >= 1");
  ck.require(s.max_active <= s.num_experts, "moe.max_active", s.max_active,
             "must be <= num_experts (" + std::to_string(s.num_experts) + ")");
  ck.require(moe.d_expert() >= 0, "moe.d_expert", moe.d_expert(), "must be >= 0 (0: 2 * d_model)");
  ck.require(s.num_experts <= kMaxExperts, "moe.num_experts", s.num_experts,
             "must be <= " + std::to_string(kMaxExperts));
  ck.require(s.d_expert <= kMaxInner, "moe.d_expert", s.d_expert,
             "must be <= " + std::to_string(kMaxInner));
  ck.require(s.d_shared <= kMaxInner, "moe.d_shared", s.d_shared,
             "must be <= " + std::to_string(kMaxInner));
  ck.require(s.moe_chunk >= 1, "moe.chunk", s.moe_chunk, "must be >= 1");
  ck.require(s.moe_chunk >= 1 && s.max_seq_len % s.moe_chunk == 0, "moe.chunk", s.moe_chunk,
             "must divide max_seq_len (" + std::to_string(s.max_seq_len) + ")");
  ck.require(moe.capacity_factor() >= 0, "moe.capacity_factor", moe.capacity_factor(),
             "must be >= 0 (0: dropless)");
  ck.require(moe.balance_loss_weight() >= 0, "moe.balance_loss_weight", moe.balance_loss_weight(),
             "must be >= 0");
  ck.require(moe.locality_loss_weight() >= 0, "moe.locality_loss_weight",
             moe.locality_loss_weight(), "must be >= 0");
  ck.require(moe.sparsity_coef_init() >= 0, "moe.sparsity_coef_init", moe.sparsity_coef_init(),
             "must be >= 0");
  ck.require(moe.target_sparsity() >= 0 && moe.target_sparsity() < 1, "moe.target_sparsity",
             moe.target_sparsity(), "must be in [0, 1)");
  ck.require(moe.sparsity_adapt_rate() >= 0, "moe.sparsity_adapt_rate", moe.sparsity_adapt_rate(),
             "must be >= 0");
  ck.require(moe.activation_alpha() > 0, "moe.activation_alpha", moe.activation_alpha(),
             "must be > 0");
  ck.require(moe.sparsity_group() >= 1, "moe.sparsity_group", moe.sparsity_group(), "must be >= 1");
  ck.require(moe.router_eps() > 0, "moe.router_eps", moe.router_eps(), "must be > 0");
  ck.require(moe.objective() == config::MoeConfig::BLOCKFFN ||  // (its cap: blockffn_cap)
                 moe.sparsity_coef_max() >= moe.sparsity_coef_init(),
             "moe.sparsity_coef_max", moe.sparsity_coef_max(),
             "must be >= sparsity_coef_init (" + std::to_string(moe.sparsity_coef_init()) + ")");
}

// The workspace memory: slots, chunks, heads, where it sits.
void workspace_part(const config::ModelConfig& c, Checker& ck, ModelSpec& s) {
  const auto& ws = c.workspace();
  s.ws_slots = ws.slots();
  s.ws_chunk = ws.chunk();
  s.ws_heads = ws.num_heads();
  s.ws_dim = ws.attn_dim() > 0 ? ws.attn_dim() : std::max<int64_t>(1, s.d / 2);
  s.ws_parallel_write = ws.write() == config::WorkspaceConfig::PARALLEL;
  if (ws.enabled()) {
    if (ws.after_block_size() > 0) {
      s.ws_after.assign(ws.after_block().begin(), ws.after_block().end());
    } else {
      for (double frac : {1.0 / 3.0, 2.0 / 3.0}) {
        const int64_t b =
            std::clamp<int64_t>(std::llround(frac * s.num_blocks) - 1, 0, s.num_blocks - 1);
        if (std::find(s.ws_after.begin(), s.ws_after.end(), b) == s.ws_after.end())
          s.ws_after.push_back(b);
      }
    }
    ck.require(s.ws_slots >= 1 && s.ws_slots <= kMaxInner, "workspace.slots", s.ws_slots,
               "must be in [1, " + std::to_string(kMaxInner) + "]");
    ck.require(s.ws_dim <= kMaxWidth, "workspace.attn_dim", s.ws_dim,
               "must be <= " + std::to_string(kMaxWidth));
    ck.require(s.ws_chunk >= 1 && s.max_seq_len % s.ws_chunk == 0, "workspace.chunk", s.ws_chunk,
               "must be >= 1 and divide max_seq_len (" + std::to_string(s.max_seq_len) + ")");
    ck.require(s.ws_heads >= 1 && s.ws_dim % s.ws_heads == 0, "workspace.num_heads", s.ws_heads,
               "must be >= 1 and divide attn_dim (" + std::to_string(s.ws_dim) + ")");
    for (int64_t b : s.ws_after)
      ck.require(b >= 0 && b < s.num_blocks, "workspace.after_block", list_str(s.ws_after),
                 "must hold block indices in [0, " + std::to_string(s.num_blocks) + ")");
  }
}

// The product-key memory: heads, keys, top-k, where it sits.
void pkm_part(const config::ModelConfig& c, Checker& ck, ModelSpec& s) {
  const auto& pkm = c.pkm();
  s.pkm_heads = pkm.num_heads();
  s.pkm_k_dim = pkm.k_dim();
  s.pkm_n_keys = pkm.n_keys();
  s.pkm_topk = pkm.topk();
  if (pkm.enabled()) {
    if (pkm.after_block_size() > 0) {
      s.pkm_after.assign(pkm.after_block().begin(), pkm.after_block().end());
    } else {
      s.pkm_after.push_back(std::clamp<int64_t>(s.num_blocks / 2 - 1, 0, s.num_blocks - 1));
    }
    ck.require(s.pkm_heads >= 1 && s.pkm_heads <= 1024, "pkm.num_heads", s.pkm_heads,
               "must be in [1, 1024]");
    ck.require(s.pkm_k_dim >= 2 && s.pkm_k_dim % 2 == 0 && s.pkm_k_dim <= kMaxWidth, "pkm.k_dim",
               s.pkm_k_dim, "must be even and in [2, " + std::to_string(kMaxWidth) + "]");
    ck.require(s.pkm_n_keys >= 1, "pkm.n_keys", s.pkm_n_keys, "must be >= 1");
    ck.require(s.pkm_n_keys <= kMaxKeys, "pkm.n_keys", s.pkm_n_keys,
               "must be <= " + std::to_string(kMaxKeys));
    ck.require(s.pkm_topk >= 1 && s.pkm_topk <= s.pkm_n_keys, "pkm.topk", s.pkm_topk,
               "must be in [1, n_keys] (n_keys = " + std::to_string(s.pkm_n_keys) + ")");
    for (int64_t b : s.pkm_after)
      ck.require(b >= 0 && b < s.num_blocks, "pkm.after_block", list_str(s.pkm_after),
                 "must hold block indices in [0, " + std::to_string(s.num_blocks) + ")");
  }
}

}  // namespace

int64_t ModelSpec::sga_blocks() const { return std::count(has_sga.begin(), has_sga.end(), true); }

Expected<ModelSpec> make_spec(const config::ModelConfig& cfg_in, const std::string& source) {
  ModelSpec s;
  s.cfg = cfg_in;
  config::resolve_defaults(&s.cfg);
  HYDRA_RETURN_IF_ERROR(config::check_finite_numbers(s.cfg, source, "model"));
  const auto& c = s.cfg;
  Checker ck(source);
  s.transformer = c.kind() == config::ModelConfig::TRANSFORMER;
  s.d = c.d_model();
  s.num_blocks = c.num_blocks();
  s.vocab = c.vocab_size();
  s.max_seq_len = c.max_seq_len();
  s.norm_eps = c.norm_eps();
  s.init_std = c.init_std();
  ck.require(s.vocab >= 2, "vocab_size", s.vocab, "must be >= 2");
  ck.require(s.d >= 1, "d_model", s.d, "must be >= 1");
  ck.require(s.num_blocks >= 1, "num_blocks", s.num_blocks, "must be >= 1");
  ck.require(s.max_seq_len >= 1, "max_seq_len", s.max_seq_len, "must be >= 1");
  ck.require(s.norm_eps > 0, "norm_eps", s.norm_eps, "must be > 0");
  ck.require(s.init_std > 0, "init_std", s.init_std, "must be > 0");
  // Upper bounds far past any model this trainer can hold, so that sizes multiply without overflow
  // and a typo (an extra zero or three) gets a message instead of an allocation failure.
  ck.require(s.vocab <= kMaxVocab, "vocab_size", s.vocab,
             "must be <= " + std::to_string(kMaxVocab));
  ck.require(s.d <= kMaxWidth, "d_model", s.d, "must be <= " + std::to_string(kMaxWidth));
  ck.require(s.num_blocks <= kMaxBlocks, "num_blocks", s.num_blocks,
             "must be <= " + std::to_string(kMaxBlocks));
  ck.require(s.max_seq_len <= kMaxSeqLen, "max_seq_len", s.max_seq_len,
             "must be <= " + std::to_string(kMaxSeqLen));
  if (!ck.status().ok()) return ck.status();

  if (s.transformer) {
    transformer_part(c, ck, s);
    if (!ck.status().ok()) return ck.status();
    return s;
  }
  ssm_part(c, ck, s);
  sga_part(c, ck, s);
  moe_part(c, ck, s);
  workspace_part(c, ck, s);
  pkm_part(c, ck, s);
  if (!ck.status().ok()) return ck.status();
  return s;
}

}  // namespace hydra::model
