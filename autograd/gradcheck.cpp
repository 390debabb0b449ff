#include "autograd/gradcheck.h"

#include <cmath>
#include <sstream>

#include "autograd/grad_mode.h"
#include "autograd/ops.h"

namespace hydra {
namespace {

double weighted_sum(const std::vector<Tensor>& outs, const std::vector<Tensor>& weights) {
  double total = 0;
  for (std::size_t i = 0; i < outs.size(); ++i) {
    if (!weights[i].defined()) continue;
    const std::vector<double> o = outs[i].to_vector<double>(), w = weights[i].to_vector<double>();
    for (std::size_t j = 0; j < o.size(); ++j) total += o[j] * w[j];
  }
  return total;
}

}  // namespace

Status gradcheck(const GradcheckFn& fn, const std::vector<Tensor>& inputs,
                 const GradcheckOptions& options) {
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    const Tensor& t = inputs[i];
    if (!t.defined() || !t.requires_grad()) continue;
    if (t.dtype() != DType::kF64 || !t.device().is_cpu() || !t.is_contiguous())
      return invalid_argument("gradcheck: input " + std::to_string(i) +
                              " must be a contiguous f64 CPU tensor");
    t.set_grad(Tensor());
    t.set_sparse_grad(nullptr);
  }
  Generator gen(options.seed);
  std::vector<Tensor> outs = fn(inputs);
  std::vector<Tensor> weights;
  Tensor loss;
  for (const Tensor& o : outs) {
    if (!o.defined() || !is_floating(o.dtype()) || !o.requires_grad()) {
      weights.emplace_back();
      continue;
    }
    Tensor w = randn(o.shape(), gen, 0, 1, DType::kF64);
    weights.push_back(w);
    Tensor term = sum(mul(o.to(DType::kF64), w));
    loss = loss.defined() ? add(loss, term) : term;
  }
  if (!loss.defined()) return invalid_argument("gradcheck: no output requires grad");
  loss.backward();

  std::ostringstream report;
  int bad = 0;
  NoGradGuard no_grad;
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    const Tensor& t = inputs[i];
    if (!t.defined() || !t.requires_grad()) continue;
    const Tensor g = t.sparse_grad() ? densify_sparse_grad(t) : t.grad();
    const std::vector<double> analytic =
        g.defined() ? g.to_vector<double>() : std::vector<double>(t.numel(), 0.0);
    double* x = t.data<double>();
    std::vector<int64_t> elements;
    const int64_t n = t.numel(), m = options.max_elements_per_input;
    if (m > 0 && m < n) {
      for (int64_t i = 0; i < m; ++i) elements.push_back(m == 1 ? 0 : i * (n - 1) / (m - 1));
    } else {
      for (int64_t i = 0; i < n; ++i) elements.push_back(i);
    }
    for (int64_t j : elements) {
      const double orig = x[j];
      x[j] = orig + options.eps;
      const double lp = weighted_sum(fn(inputs), weights);
      x[j] = orig - options.eps;
      const double lm = weighted_sum(fn(inputs), weights);
      x[j] = orig;
      const double numeric = (lp - lm) / (2 * options.eps);
      const double err = std::abs(analytic[j] - numeric);
      if (!(err <= options.atol + options.rtol * std::abs(numeric))) {
        if (bad < 8)
          report << "\n  input " << i << " " << shape_str(t.shape()) << " element " << j
                 << ": analytic " << analytic[j] << ", numeric " << numeric << " (error " << err
                 << ")";
        ++bad;
      }
    }
  }
  if (bad == 0) return ok_status();
  return internal_error("gradcheck: " + std::to_string(bad) +
                        " gradient entries differ:" + report.str());
}

}  // namespace hydra
