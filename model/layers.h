// Small building blocks: parameter initialisation, Linear, RMSNorm, a dense SwiGLU.
#pragma once

#include "autograd/module.h"
#include "autograd/ops.h"

namespace hydra::model {

// Draws initial values from one generator in a fixed order (the order parameters are created), so a
// seed gives the same model on every machine. Tensors are made on the CPU in f32.
class Init {
 public:
  explicit Init(uint64_t seed) : gen_(seed) {}
  Tensor normal(const Shape& shape, double stddev) { return randn(shape, gen_, 0.0, stddev); }
  Tensor uniform(const Shape& shape, double low, double high) {
    return rand(shape, gen_, low, high);
  }
  Tensor constant(const Shape& shape, double value) { return full(shape, value); }
  Generator& generator() { return gen_; }

 private:
  Generator gen_;
};

class Linear : public Module {
 public:
  // weight [out, in] ~ N(0, stddev); bias zeros when `bias`.
  Linear(Init& init, int64_t in, int64_t out, double stddev, bool bias = false);
  Linear(Tensor weight, Tensor bias);
  Tensor forward(const Tensor& x) const { return linear(x, weight, bias); }
  Tensor weight, bias;
};

class RMSNorm : public Module {
 public:
  RMSNorm(int64_t dim, double eps);
  Tensor forward(const Tensor& x) const { return rms_norm(x, weight, eps_); }
  double eps() const { return eps_; }
  Tensor weight;

 private:
  double eps_;
};

// SwiGLU feed-forward: w2 (SiLU(w1 x) * w3 x).
class SwiGLU : public Module {
 public:
  SwiGLU(Init& init, int64_t d, int64_t hidden, double stddev, double out_stddev);
  Tensor forward(const Tensor& x) const;
  std::shared_ptr<Linear> w1, w3, w2;
};

// Decoding a chunked layer (MoE, workspace) in segments: the inputs of the chunk in progress
// (`pending` [B, r, d], undefined when r = 0) then the segment's x [B, L, d], from the chunk's
// start.
struct ChunkedSegment {
  ChunkedSegment(const Tensor& pending, const Tensor& x, int64_t chunk);
  Tensor from_start;                       // [B, r + L, d]
  Tensor padded;                           // zero-padded to whole chunks: [B, chunks * chunk, d]
  int64_t r = 0, whole = 0;                // pending tokens; chunks complete after the segment
  Tensor pending_after() const;            // the next segment's `pending`
  Tensor segment(const Tensor& y) const {  // the segment's rows of an output over `padded`
    return y.narrow(1, r, length_);
  }

 private:
  int64_t chunk_, length_;
};

// -sum p log p over every element of the probabilities p (0 log 0 = 0), computed on p's device in
// at least fp32, as a one-element tensor (statistics; no gradient).
Tensor entropy_sum(const Tensor& p);

}  // namespace hydra::model
