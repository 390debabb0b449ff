#include "model/workspace.h"

#include <cmath>

#include "autograd/grad_mode.h"

namespace hydra::model {

WorkspaceMemory::WorkspaceMemory(Init& init, const ModelSpec& spec, int64_t index)
    : index_(index), num_slots_(spec.ws_slots), chunk_(spec.ws_chunk), heads_(spec.ws_heads), dim_(spec.ws_dim) {
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
}

namespace {

// [B, n, H*ah] -> [B, H, n, ah]
Tensor heads_first(const Tensor& t, int64_t H) {
  return t.reshape({t.size(0), t.size(1), H, t.size(2) / H}).permute({0, 2, 1, 3});
}

}  // namespace

Tensor WorkspaceMemory::forward(const Tensor& x, ForwardContext& ctx, const Tensor& state, Tensor* next) const {
  const int64_t B = x.size(0), L = x.size(1), d = x.size(2), M = num_slots_, c = chunk_, H = heads_, a = dim_;
  HYDRA_CHECK(L % c == 0) << "workspace: sequence length " << L << " is not a multiple of workspace.chunk " << c;
  const int64_t nC = L / c, ah = a / H;
  const double scale = 1.0 / std::sqrt(static_cast<double>(ah));

  // Keys and values of every token for the writes, once.
  const Tensor wk = write_k->forward(x), wv = write_v->forward(x);  // [B, L, a]
  Tensor S = state.defined() ? state : slots.unsqueeze(0).expand({B, M, d});
  std::vector<Tensor> states;
  std::vector<Tensor> gates;
  for (int64_t j = 0; j < nC; ++j) {
    states.push_back(S.unsqueeze(1));
    const Tensor q = heads_first(write_q->forward(S), H);                          // [B, H, M, ah]
    const Tensor k = heads_first(wk.narrow(1, j * c, c), H);                       // [B, H, c, ah]
    const Tensor v = heads_first(wv.narrow(1, j * c, c), H);
    const Tensor att = softmax(mul(matmul(q, k.transpose(2, 3)), scale));          // [B, H, M, c]
    const Tensor upd = write_o->forward(matmul(att, v).permute({0, 2, 1, 3}).reshape({B, M, a}));  // [B, M, d]
    const Tensor g = sigmoid(gate->forward(concat({S, upd}, 2)));                   // [B, M, 1]
    S = add(S, mul(g, sub(upd, S)));                                               // (1 - g) S + g upd
    if (ctx.recording()) gates.push_back(g.detach());
  }
  if (next != nullptr) *next = S;

  // Reads: the tokens of chunk j attend to S_j, all chunks at once.
  const Tensor all = concat(states, 1);                                                     // [B, nC, M, d]
  const Tensor kr = read_k->forward(all).view({B, nC, M, H, ah}).permute({0, 1, 3, 2, 4});  // [B, nC, H, M, ah]
  const Tensor vr = read_v->forward(all).view({B, nC, M, H, ah}).permute({0, 1, 3, 2, 4});
  const Tensor qr = read_q->forward(x).view({B, nC, c, H, ah}).permute({0, 1, 3, 2, 4});   // [B, nC, H, c, ah]
  const Tensor att = softmax(mul(matmul(qr, kr.transpose(3, 4)), scale));                  // [B, nC, H, c, M]
  const Tensor read = matmul(att, vr).permute({0, 1, 3, 2, 4}).reshape({B, L, a});

  if (ctx.recording()) {  // on the device; two numbers come back
    NoGradGuard no_grad;
    const std::string p = "workspace." + std::to_string(index_) + ".";
    ctx.stat(p + "write_gate_mean", gates.empty() ? 0.0 : mean(concat(gates, 0)).item<double>());
    ctx.stat(p + "slot_entropy", entropy_sum(att).item<double>() / double(att.numel() / M));
  }
  return read_o->forward(read);
}

}  // namespace hydra::model
