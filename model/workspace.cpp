#include "model/workspace.h"

#include <cmath>

#include "autograd/grad_mode.h"

namespace hydra::model {

WorkspaceMemory::WorkspaceMemory(Init& init, const ModelSpec& spec, int64_t index)
    : index_(index),
      num_slots_(spec.ws_slots),
      chunk_(spec.ws_chunk),
      heads_(spec.ws_heads),
      dim_(spec.ws_dim) {
  const int64_t d = spec.d, a = dim_;
  const double sd = spec.init_std, out_sd = spec.init_std / std::sqrt(2.0 * spec.num_blocks);
  slots = register_parameter("slots", init.normal({num_slots_, d}, sd));
  read_q = register_module("read_q", std::make_shared<Linear>(init, d, a, sd));
  read_k = register_module("read_k", std::make_shared<Linear>(init, d, a, sd));
  read_v = register_module("read_v", std::make_shared<Linear>(init, d, a, sd));
  read_o = register_module("read_o", std::make_shared<Linear>(init, a, d, out_sd));
  write_q = register_module("write_q", std::make_shared<Linear>(init, d, a, sd));
  write_k = register_module("write_k", std::make_shared<Linear>(init, d, a, sd));
  write_v = register_module("write_v", std::make_shared<Linear>(init, d, a, sd));
  write_o = register_module("write_o", std::make_shared<Linear>(init, a, d, sd));
  gate = register_module("gate", std::make_shared<Linear>(init, 2 * d, 1, sd, /*bias=*/true));
  fused_attention_ = dim_ / heads_ <= 128;
  parallel_write_ = spec.ws_parallel_write;
}

namespace {

// Cross-attention in which every query sees every key: q [N, Lq, H, ah], k and v [N, Lk, H, ah]
// (heads inside each token's row, as the projections produce them) -> [N, Lq, H, ah] contiguous.
// Fused: the sparse-attention kernel with the dense causal pattern and the queries placed after the
// last key (one flash-style kernel, no probability matrix kept, no head-major copies). Explicit:
// batched GEMMs over head-major copies and a softmax (for heads wider than the fused kernels' 128).
Tensor all_visible_attention(const Tensor& q, const Tensor& k, const Tensor& v, double scale,
                             bool fused) {
  if (fused)
    return sparse_attention(q, k, v, AttentionPattern{0, 0}, scale, /*q_pos0=*/k.size(1),
                            /*k_pos0=*/0);
  const auto heads_first = [](const Tensor& t) {
    return t.permute({0, 2, 1, 3});
  };  // [N, H, L, ah]
  const Tensor att = softmax(mul(matmul(heads_first(q), heads_first(k).transpose(2, 3)), scale));
  return matmul(att, heads_first(v)).permute({0, 2, 1, 3}).contiguous();
}

}  // namespace

Tensor WorkspaceMemory::write_serial(const Tensor& xc, const Tensor& s0,
                                     std::vector<Tensor>* gates) const {
  const int64_t nC = xc.size(0), B = xc.size(1), c = xc.size(2), M = num_slots_, H = heads_,
                a = dim_, ah = a / H;
  const double scale = 1.0 / std::sqrt(static_cast<double>(ah));
  // Keys and values of every token, once; split hands each chunk's out with a single concatenating
  // backward.
  const std::vector<int64_t> ones(nC, 1);
  const std::vector<Tensor> wk = split(write_k->forward(xc), ones, 0),
                            wv = split(write_v->forward(xc), ones, 0);
  Tensor S = s0;
  std::vector<Tensor> states;
  for (int64_t j = 0; j < nC; ++j) {
    states.push_back(S.unsqueeze(0));
    const Tensor q = write_q->forward(S).view({B, M, H, ah});
    const Tensor k = wk[j].view({B, c, H, ah}), v = wv[j].view({B, c, H, ah});
    const Tensor o = all_visible_attention(q, k, v, scale, fused_attention_);
    const Tensor upd = write_o->forward(o.view({B, M, a}));  // [B, M, d]
    // (1 - g) S + g upd with g = sigmoid(gate([S; upd])), per slot: one kernel.
    auto [next_S, g] = gated_update(S, upd, gate->weight, gate->bias);  // g [B, M, 1]
    S = next_S;
    if (gates != nullptr) gates->push_back(g);
  }
  states.push_back(S.unsqueeze(0));
  return concat(states, 0);
}

Tensor WorkspaceMemory::write_parallel(const Tensor& xc, const Tensor& s0,
                                       std::vector<Tensor>* gates) const {
  const int64_t nC = xc.size(0), B = xc.size(1), c = xc.size(2), d = xc.size(3), M = num_slots_,
                H = heads_, a = dim_, ah = a / H;
  const double scale = 1.0 / std::sqrt(static_cast<double>(ah));
  // Every chunk's update at once: the learned slots' queries (the same for every chunk and
  // sequence) against each chunk's keys and values, batch nC * B.
  const Tensor q0 =
      write_q->forward(slots).view({1, M, H, ah}).expand({nC * B, M, H, ah}).contiguous();
  const Tensor k = write_k->forward(xc).view({nC * B, c, H, ah}),
               v = write_v->forward(xc).view({nC * B, c, H, ah});
  const Tensor o = all_visible_attention(q0, k, v, scale, fused_attention_);  // [nC B, M, H, ah]
  const Tensor upd = write_o->forward(o.view({nC, B * M, a}));                // [nC, B M, d]
  // The gated chain S_{j+1} = gated_update(S_j, upd_j) over all chunks: one kernel each way.
  auto [h, g] =
      gated_scan(s0.reshape({B * M, d}), upd, gate->weight, gate->bias);  // h [nC + 1, B M, d]
  if (gates != nullptr) gates->push_back(g);
  return h.view({nC + 1, B, M, d});
}

Tensor WorkspaceMemory::forward(const Tensor& x, ForwardContext& ctx, const Tensor& state,
                                Tensor* next) const {
  HYDRA_CHECK(x.size(1) % chunk_ == 0) << "workspace: sequence length " << x.size(1)
                                       << " is not a multiple of workspace.chunk " << chunk_;
  return run(x, ctx, state, x.size(1) / chunk_, next);
}

Tensor WorkspaceMemory::forward_carried(const Tensor& x, ForwardContext& ctx,
                                        WorkspaceCarry& carry) const {
  // The padded chunk only reads (its write waits for its last token), so the padding reaches no
  // output we keep.
  const ChunkedSegment seg(carry.pending, x, chunk_);
  Tensor next;
  const Tensor out = run(seg.padded, ctx, carry.slots, seg.whole, &next);
  carry.slots = next;
  carry.pending = seg.pending_after();
  return seg.segment(out);
}

Tensor WorkspaceMemory::run(const Tensor& x, ForwardContext& ctx, const Tensor& state,
                            int64_t writes, Tensor* next) const {
  const int64_t B = x.size(0), L = x.size(1), d = x.size(2), M = num_slots_, c = chunk_, H = heads_,
                a = dim_;
  const int64_t nC = L / c, ah = a / H;
  const double scale = 1.0 / std::sqrt(static_cast<double>(ah));

  // The tokens chunk-major ([nC, B, c, d]) so that each chunk's are one contiguous block.
  const Tensor xc =
      nC == 1 ? x.unsqueeze(0) : x.reshape({B, nC, c, d}).permute({1, 0, 2, 3}).contiguous();
  const Tensor s0 = state.defined() ? state : slots.unsqueeze(0).expand({B, M, d});
  std::vector<Tensor> gates;
  std::vector<Tensor>* record = ctx.recording() ? &gates : nullptr;
  // [writes + 1, B, M, d]: the slots entering each chunk, and after the last write.
  const Tensor xw = writes == nC ? xc : xc.narrow(0, 0, writes);
  const Tensor h = writes == 0       ? s0.unsqueeze(0).contiguous()
                   : parallel_write_ ? write_parallel(xw, s0, record)
                                     : write_serial(xw, s0, record);
  if (next != nullptr) *next = h.select(0, writes);

  // Reads: the tokens of chunk j attend to S_j, all chunks at once (batch nC * B, chunk-major).
  const Tensor entering = h.narrow(0, 0, nC);  // [nC, B, M, d]
  const Tensor kr = read_k->forward(entering).view({nC * B, M, H, ah});
  const Tensor vr = read_v->forward(entering).view({nC * B, M, H, ah});
  const Tensor qr = read_q->forward(xc).view({nC * B, c, H, ah});
  const Tensor read =
      all_visible_attention(qr, kr, vr, scale, fused_attention_).view({nC, B, c, a});

  if (ctx.recording()) {  // on the device; two numbers come back
    NoGradGuard no_grad;
    const std::string p = "workspace." + std::to_string(index_) + ".";
    // Slot usage: the entropy of the reads' attention over the slots (recomputed: the fused kernel
    // keeps no probabilities).
    const Tensor att =
        softmax(mul(matmul(qr.permute({0, 2, 1, 3}), kr.permute({0, 2, 3, 1})), scale));
    const int64_t reads = att.numel() / M;  // (chunk, head, query) rows of M slots each
    std::vector<Tensor> values = {entropy_sum(att)};
    if (!gates.empty()) {
      std::vector<Tensor> flat;
      flat.reserve(gates.size());
      for (const Tensor& g : gates) flat.push_back(g.reshape({-1}));
      values.push_back(mean(concat(flat, 0)));
    }
    ctx.stat_later(values, [p, reads](const std::vector<Tensor>& h, ForwardContext& c) {
      c.stat(p + "write_gate_mean", h.size() > 1 ? h[1].item<double>() : 0.0);
      c.stat(p + "slot_entropy", h[0].item<double>() / double(reads));
    });
  }
  // Back to token order: the output projection first (d and a are alike in size), then one copy.
  const Tensor out = read_o->forward(read);  // [nC, B, c, d]
  return nC == 1 ? out.select(0, 0) : out.permute({1, 0, 2, 3}).reshape({B, L, d});
}

}  // namespace hydra::model
