#include <numeric>

#include "autograd/dispatch.h"
#include "autograd/ops.h"
#include "kernels/copy.h"
#include "kernels/random.h"

namespace hydra {

Generator& default_generator() {
  static Generator gen(0);
  return gen;
}

Tensor scratch(Device device, std::size_t bytes) {
  return Tensor::empty({static_cast<int64_t>((bytes + 7) / 8)}, DType::kI64, device);
}

Tensor empty(const Shape& shape, DType dtype, Device device) {
  return Tensor::empty(shape, dtype, device);
}

Tensor full(const Shape& shape, double value, DType dtype, Device device) {
  Tensor t = Tensor::empty(shape, dtype, device);
  t.fill_(value);
  return t;
}

Tensor zeros(const Shape& shape, DType dtype, Device device) {
  return full(shape, 0.0, dtype, device);
}
Tensor ones(const Shape& shape, DType dtype, Device device) {
  return full(shape, 1.0, dtype, device);
}
Tensor empty_like(const Tensor& t) { return empty(t.shape(), t.dtype(), t.device()); }
Tensor zeros_like(const Tensor& t) { return zeros(t.shape(), t.dtype(), t.device()); }
Tensor ones_like(const Tensor& t) { return ones(t.shape(), t.dtype(), t.device()); }

Tensor arange(int64_t n, DType dtype, Device device) {
  std::vector<int64_t> v(n);
  std::iota(v.begin(), v.end(), int64_t{0});
  return tensor(v, {n}).to(dtype).to(device);
}

namespace {

void fill_random(Tensor& t, Generator& gen, kernels::RandomDist dist, double a, double b) {
  HYDRA_CHECK(t.is_contiguous()) << "random fill of a non-contiguous tensor";
  kernels::RandomParams p;
  p.dtype = t.dtype();
  p.dist = dist;
  p.dst = t.raw_data();
  p.n = t.numel();
  p.seed = gen.seed();
  p.offset = gen.reserve(t.numel());
  p.a = a;
  p.b = b;
  p.stream = current_stream(t.device());
  if (p.n > 0) HYDRA_LAUNCH(t.device(), fill_random, p);
  if (t.storage()) t.storage()->bump_version();
}

}  // namespace

Tensor rand(const Shape& shape, Generator& gen, double low, double high, DType dtype,
            Device device) {
  Tensor t = Tensor::empty(shape, dtype, device);
  fill_random(t, gen, kernels::RandomDist::kUniform, low, high);
  return t;
}

Tensor randn(const Shape& shape, Generator& gen, double mean, double stddev, DType dtype,
             Device device) {
  HYDRA_CHECK(is_floating(dtype)) << "randn: dtype must be floating, got " << dtype_name(dtype);
  Tensor t = Tensor::empty(shape, dtype, device);
  fill_random(t, gen, kernels::RandomDist::kNormal, mean, stddev);
  return t;
}

Tensor randint(int64_t low, int64_t high, const Shape& shape, Generator& gen, DType dtype,
               Device device) {
  HYDRA_CHECK(is_integral(dtype)) << "randint: dtype must be i32 or i64, got " << dtype_name(dtype);
  HYDRA_CHECK(low < high) << "randint: empty range [" << low << ", " << high << ")";
  Tensor t = Tensor::empty(shape, dtype, device);
  fill_random(t, gen, kernels::RandomDist::kUniform, static_cast<double>(low),
              static_cast<double>(high));
  return t;
}

void normal_(Tensor& t, Generator& gen, double mean, double stddev) {
  fill_random(t, gen, kernels::RandomDist::kNormal, mean, stddev);
}

void uniform_(Tensor& t, Generator& gen, double low, double high) {
  fill_random(t, gen, kernels::RandomDist::kUniform, low, high);
}

}  // namespace hydra
