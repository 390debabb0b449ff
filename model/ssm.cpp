#include "model/ssm.h"

#include <cmath>
#include <vector>

#include "parallel/sequence.h"

namespace hydra::model {

SsmMixer::SsmMixer(Init& init, const ModelSpec& spec)
    : d_inner_(spec.d_inner),
      d_state_(spec.d_state),
      dt_rank_(spec.dt_rank),
      conv_width_(spec.conv_width),
      scan_chunk_(spec.scan_chunk),
      ssd_(spec.ssd) {
  const int64_t d = spec.d, di = d_inner_, N = d_state_, R = dt_rank_, W = conv_width_;
  // The decay rates and deltas: one per channel (SELECTIVE), or one per head (SSD).
  const int64_t H = spec.ssm_heads;
  const auto& sc = spec.cfg.ssm();
  // Linear layers as PyTorch initialises them (U(+-1/sqrt(fan_in))), as Mamba does; the residual
  // output projection scaled down by sqrt(2 * blocks) (GPT-2).
  auto fan_in = [&](int64_t in, int64_t out) {
    const double b = 1.0 / std::sqrt(static_cast<double>(in));
    return std::make_shared<Linear>(init.uniform({out, in}, -b, b), Tensor());
  };
  in_proj = register_module("in_proj", fan_in(d, 2 * di));
  if (W > 0) {  // conv_width 0: no convolution (u = SiLU(x))
    const double cb = 1.0 / std::sqrt(static_cast<double>(W));
    conv_weight = register_parameter("conv_weight", init.uniform({di, W}, -cb, cb));
    conv_bias = register_parameter("conv_bias", init.uniform({di}, -cb, cb),
                                   ParamOptions{.weight_decay = false});
  }
  x_proj = register_module("x_proj", fan_in(di, R + 2 * N));
  // dt_proj: weight U(+-dt_rank^-0.5); bias = softplus^-1(dt) with dt log-uniform in [dt_min,
  // dt_max].
  const double dt_std = 1.0 / std::sqrt(static_cast<double>(R));
  Tensor dtw = init.uniform({H, R}, -dt_std, dt_std);
  const std::vector<float> u = init.uniform({H}, 0.0, 1.0).to_vector<float>();
  std::vector<float> bias(H);
  for (int64_t i = 0; i < H; ++i) {
    double dt =
        std::exp(u[i] * (std::log(sc.dt_max()) - std::log(sc.dt_min())) + std::log(sc.dt_min()));
    dt = std::max(dt, sc.dt_init_floor());
    bias[i] = static_cast<float>(dt + std::log(-std::expm1(-dt)));
  }
  dt_proj = register_module("dt_proj", std::make_shared<Linear>(dtw, tensor(bias, {H})));
  if (ssd_) {  // A = -U(1, 16) per head (Mamba-2's A_init_range)
    A_log = register_parameter("A_log", log(init.uniform({H}, 1.0, 16.0)),
                               ParamOptions{.weight_decay = false});
  } else {  // A = -(1..N) per channel
    std::vector<float> a(di * N);
    for (int64_t i = 0; i < di; ++i)
      for (int64_t n = 0; n < N; ++n) a[i * N + n] = static_cast<float>(std::log(double(n + 1)));
    A_log = register_parameter("A_log", tensor(a, {di, N}), ParamOptions{.weight_decay = false});
  }
  // D = 1.
  D = register_parameter("D", ones({di}), ParamOptions{.weight_decay = false});
  out_proj = register_module(
      "out_proj",
      std::make_shared<Linear>(init, di, d, spec.init_std / std::sqrt(2.0 * spec.num_blocks)));
}

Tensor SsmMixer::forward(const Tensor& x, const SsmState& state, SsmState* next,
                         parallel::Communicator* sp) const {
  const int64_t B = x.size(0), L = x.size(1), di = d_inner_, N = d_state_, R = dt_rank_,
                W = conv_width_;
  const Tensor xz = in_proj->forward(x);  // [B, L, 2 di]
  const auto uz = split(xz, {di, di}, 2);
  Tensor u;
  if (W > 0) {
    const Tensor prefix = sp != nullptr ? parallel::conv_halo(uz[0], W, *sp) : state.conv;
    u = causal_conv1d(uz[0], conv_weight, conv_bias, prefix, /*silu=*/true);
  } else {
    u = silu(uz[0]);
  }
  const Tensor x_dbl = x_proj->forward(u);  // [B, L, R + 2N]
  const auto parts = split(x_dbl, {R, N, N}, 2);
  // [B, L, d_inner] (SELECTIVE) or [B, L, heads] (SSD); dt_proj's bias goes in as dt_bias.
  const Tensor delta_raw = linear(parts[0], dt_proj->weight);
  const Tensor h0 = sp != nullptr ? Tensor() : state.ssm;
  SelectiveScanResult scan;
  if (ssd_)
    scan = sp != nullptr ? parallel::ssd_scan(*sp, u, delta_raw, A_log, parts[1], parts[2], D,
                                              dt_proj->bias, uz[1], h0, scan_chunk_)
                         : ssd_scan(u, delta_raw, A_log, parts[1], parts[2], D, dt_proj->bias,
                                    uz[1], h0, scan_chunk_);
  else
    scan = sp != nullptr ? parallel::selective_scan(*sp, u, delta_raw, A_log, parts[1], parts[2], D,
                                                    dt_proj->bias, uz[1], h0, scan_chunk_)
                         : selective_scan(u, delta_raw, A_log, parts[1], parts[2], D, dt_proj->bias,
                                          uz[1], h0, scan_chunk_);
  if (next != nullptr) {
    next->ssm = scan.h_last;
    if (W > 1) {
      // The last W-1 conv inputs, reaching into the incoming prefix when the segment is short.
      Tensor history = uz[0];
      if (L < W - 1)
        history = concat(
            {state.conv.defined() ? state.conv : zeros({B, W - 1, di}, x.dtype(), x.device()),
             history},
            1);
      next->conv = history.narrow(1, history.size(1) - (W - 1), W - 1);
    }
  }
  return out_proj->forward(scan.y);
}

}  // namespace hydra::model
