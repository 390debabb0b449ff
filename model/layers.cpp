#include "model/layers.h"

#include "autograd/grad_mode.h"

namespace hydra::model {

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
