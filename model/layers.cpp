#include "model/layers.h"

#include "autograd/grad_mode.h"

namespace hydra::model {

ChunkedSegment::ChunkedSegment(const Tensor& pending, const Tensor& x, int64_t chunk)
    : chunk_(chunk), length_(x.size(1)) {
  r = pending.defined() ? pending.size(1) : 0;
  from_start = r > 0 ? concat({pending, x}, 1) : x;
  const int64_t n = r + length_, chunks = (n + chunk - 1) / chunk;
  whole = n / chunk;
  padded = chunks * chunk > n
               ? concat({from_start,
                         zeros({x.size(0), chunks * chunk - n, x.size(2)}, x.dtype(), x.device())},
                        1)
               : from_start;
}

Tensor ChunkedSegment::pending_after() const {
  const int64_t rest = from_start.size(1) - whole * chunk_;
  return rest > 0 ? from_start.narrow(1, whole * chunk_, rest).contiguous() : Tensor();
}

Linear::Linear(Init& init, int64_t in, int64_t out, double stddev, bool with_bias) {
  weight = register_parameter("weight", init.normal({out, in}, stddev));
  if (with_bias)
    bias = register_parameter("bias", zeros({out}), ParamOptions{.weight_decay = false});
}

Linear::Linear(Tensor w, Tensor b) {
  weight = register_parameter("weight", std::move(w));
  if (b.defined())
    bias = register_parameter("bias", std::move(b), ParamOptions{.weight_decay = false});
}

RMSNorm::RMSNorm(int64_t dim, double eps) : eps_(eps) {
  weight = register_parameter("weight", ones({dim}), ParamOptions{.weight_decay = false});
}

SwiGLU::SwiGLU(Init& init, int64_t d, int64_t hidden, double stddev, double out_stddev) {
  w1 = register_module("w1", std::make_shared<Linear>(init, d, hidden, stddev));
  w3 = register_module("w3", std::make_shared<Linear>(init, d, hidden, stddev));
  w2 = register_module("w2", std::make_shared<Linear>(init, hidden, d, out_stddev));
}

Tensor SwiGLU::forward(const Tensor& x) const {
  return w2->forward(mul(silu(w1->forward(x)), w3->forward(x)));
}

Tensor entropy_sum(const Tensor& p) {
  NoGradGuard no_grad;
  const Tensor q = p.dtype() == DType::kBF16 ? p.detach().to(DType::kF32) : p.detach();
  return neg(sum(mul(q, log(add(q, 1e-30)))));
}

}  // namespace hydra::model
