#include "autograd/tensor.h"

#include <atomic>
#include <chrono>
#include <cstring>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>

#include "autograd/dispatch.h"
#include "autograd/engine.h"
#include "autograd/grad_mode.h"
#include "autograd/node.h"
#include "autograd/ops.h"
#include "kernels/copy.h"
#include "kernels/elementwise.h"

#if HYDRA_WITH_CUDA
#include <cxxabi.h>
#include <execinfo.h>

#include <cstdlib>

#include "kernels/device_runtime.h"
#endif

namespace hydra {

std::string shape_str(const Shape& shape) {
  std::ostringstream os;
  os << "[";
  for (std::size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << "]";
  return os.str();
}

int64_t shape_numel(const Shape& shape) {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

Shape contiguous_strides(const Shape& shape) {
  Shape strides(shape.size());
  int64_t s = 1;
  for (int64_t i = static_cast<int64_t>(shape.size()) - 1; i >= 0; --i) {
    strides[i] = s;
    s *= shape[i];
  }
  return strides;
}

Tensor Tensor::empty(const Shape& shape, DType dtype, Device device) {
  for (int64_t s : shape) HYDRA_CHECK(s >= 0) << "negative size in shape " << shape_str(shape);
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = std::make_shared<StorageImpl>(shape_numel(shape) * dtype_size(dtype), device,
                                                current_stream(device));
  impl->shape = shape;
  impl->strides = contiguous_strides(shape);
  impl->dtype = dtype;
  return Tensor(std::move(impl));
}

Tensor Tensor::empty_pinned(const Shape& shape, DType dtype) {
  if (!cuda_available()) return empty(shape, dtype);
  for (int64_t s : shape) HYDRA_CHECK(s >= 0) << "negative size in shape " << shape_str(shape);
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = std::make_shared<StorageImpl>(shape_numel(shape) * dtype_size(dtype),
                                                cuda_pinned_allocator(), true);
  impl->shape = shape;
  impl->strides = contiguous_strides(shape);
  impl->dtype = dtype;
  return Tensor(std::move(impl));
}

Tensor Tensor::view_of(Storage storage, int64_t offset, Shape shape, Shape strides, DType dtype) {
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = std::move(storage);
  impl->offset = offset;
  impl->shape = std::move(shape);
  impl->strides = std::move(strides);
  impl->dtype = dtype;
  return Tensor(std::move(impl));
}

int64_t Tensor::size(int64_t d) const {
  const int64_t n = dim();
  HYDRA_CHECK(d >= -n && d < n) << "dimension " << d << " out of range for shape "
                                << shape_str(shape());
  return shape()[d < 0 ? d + n : d];
}

int64_t Tensor::stride(int64_t d) const {
  const int64_t n = dim();
  HYDRA_CHECK(d >= -n && d < n) << "dimension " << d << " out of range for shape "
                                << shape_str(shape());
  return strides()[d < 0 ? d + n : d];
}

bool Tensor::is_contiguous() const {
  int64_t expected = 1;
  for (int64_t i = dim() - 1; i >= 0; --i) {
    if (shape()[i] == 1) continue;
    if (strides()[i] != expected) return false;
    expected *= shape()[i];
  }
  return true;
}

void* Tensor::raw_data() const {
  const auto& st = impl().storage;
  if (!st || st->data() == nullptr) return nullptr;
  return static_cast<char*>(st->data()) + offset() * dtype_size(dtype());
}

namespace {

kernels::StridedCopyParams copy_params(const Tensor& dst, const Tensor& src) {
  HYDRA_CHECK(dst.dim() <= kernels::kMaxDims)
      << "copy: at most " << kernels::kMaxDims << " dimensions";
  kernels::StridedCopyParams p;
  p.src_dtype = src.dtype();
  p.dst_dtype = dst.dtype();
  p.src = src.raw_data();
  p.dst = dst.raw_data();
  p.ndim = static_cast<int>(dst.dim());
  for (int i = 0; i < p.ndim; ++i) {
    p.shape[i] = dst.shape()[i];
    p.src_strides[i] = src.strides()[i];
    p.dst_strides[i] = dst.strides()[i];
  }
  p.stream = current_stream(dst.device());
  return p;
}

// dst <- src, same device and shape, any strides and dtypes.
void copy_same_device(const Tensor& dst, const Tensor& src) {
  if (dst.numel() == 0) return;
  const kernels::StridedCopyParams p = copy_params(dst, src);
  std::optional<KernelProfileScope> detail;
  if (kernel_profile_detailed())
    detail.emplace(dst.device(), "copy " + std::string(dtype_name(p.src_dtype)) + "->" +
                                     std::string(dtype_name(p.dst_dtype)) + " " +
                                     profile_dims(p.shape, p.ndim) +
                                     (src.is_contiguous() ? " contiguous" : " strided"));
  HYDRA_LAUNCH(dst.device(), strided_copy, p);
}

#if HYDRA_WITH_CUDA
// HYDRA_PROFILE=2: the function that asked for a value from the device (the first caller outside
// the tensor's own reads), for the profile's wait rows. Names need the executable's symbols
// exported (hydra-train links with ENABLE_EXPORTS); otherwise "?".
std::string host_read_caller() {
  void* frames[24];
  const int n = backtrace(frames, 24);
  char** syms = backtrace_symbols(frames, n);
  std::string found = "?";
  for (int i = 1; syms != nullptr && i < n; ++i) {
    const std::string line = syms[i];
    const auto open = line.find('('), plus = line.find('+', open);
    if (open == std::string::npos || plus == std::string::npos || plus == open + 1) continue;
    const std::string mangled = line.substr(open + 1, plus - open - 1);
    int status = 0;
    char* dem = abi::__cxa_demangle(mangled.c_str(), nullptr, nullptr, &status);
    std::string name = status == 0 && dem != nullptr ? dem : mangled;
    std::free(dem);
    name = name.substr(0, name.find('('));
    if (name.find("transfer") != std::string::npos ||
        name.find("hydra::Tensor::") != std::string::npos ||
        name.rfind("hydra::PendingHostCopy", 0) == 0 || name.rfind("std::", 0) == 0)
      continue;
    found = name;
    break;
  }
  std::free(syms);
  return found;
}
#endif

#if HYDRA_WITH_CUDA
std::atomic<int64_t> g_copy_wait_ns{0};

// Runs `wait` (a synchronization), adding its time to host_copy_wait_seconds().
template <class F>
void timed_wait(F&& wait) {
  const auto t0 = std::chrono::steady_clock::now();
  wait();
  g_copy_wait_ns +=
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0)
          .count();
}
#endif

// A contiguous copy of `src` on `device` (same dtype).
Tensor transfer(const Tensor& src, Device device) {
  Tensor s = src.contiguous();
  Tensor out = Tensor::empty(s.shape(), s.dtype(), device);
  if (s.numel() == 0) return out;
#if HYDRA_WITH_CUDA
  using kernels::cuda::CopyKind;
  if (s.device().is_cpu() && device.is_cpu()) {
    std::memcpy(out.raw_data(), s.raw_data(), s.nbytes());
    return out;
  }
  const CopyKind kind = s.device().is_cpu() ? CopyKind::kHostToDevice
                        : device.is_cpu()   ? CopyKind::kDeviceToHost
                                            : CopyKind::kDeviceToDevice;
  void* stream = current_stream(device.is_cuda() ? device : s.device());
  // The profile's host rows: how long the host waits for the device (a copy to the host drains
  // the stream) and copies from pageable memory (staged by the driver).
  std::optional<KernelProfileScope> wait;
  if (kernel_profile_enabled() && kind != CopyKind::kDeviceToDevice && !s.is_pinned()) {
    if (device.is_cpu() && kernel_profile_detailed())
      wait.emplace(Device::cpu(), "host: wait for a copy to the host in " + host_read_caller());
    else
      wait.emplace(Device::cpu(), device.is_cpu() ? "host: wait for a copy to the host"
                                                  : "host: copy from pageable memory");
  }
  kernels::cuda::memcpy_async(out.raw_data(), s.raw_data(), s.nbytes(), kind, stream);
  if (device.is_cpu()) {
    timed_wait([&] { kernels::cuda::stream_synchronize(stream); });
  } else if (s.is_pinned()) {
    cuda_record_pinned_use(s.storage()->data(),
                           stream);  // async: keep the block until the copy is done
  }
#else
  HYDRA_CHECK(device.is_cpu() && s.device().is_cpu())
      << "to(" << device.str() << "): this build has no CUDA backend";
  std::memcpy(out.raw_data(), s.raw_data(), s.nbytes());
#endif
  return out;
}

void check_inplace_allowed(const Tensor& t, const char* op) {
  HYDRA_CHECK(!(GradMode::enabled() && t.requires_grad()))
      << op
      << ": in-place change of a tensor that requires grad; do it under NoGradGuard (optimizer "
         "steps) "
      << "or on a detached copy";
}

}  // namespace

Tensor Tensor::pin_memory() const {
  HYDRA_CHECK(device().is_cpu()) << "pin_memory: the tensor is on " << device().str()
                                 << ", not the CPU";
  if (is_pinned()) return *this;
  HYDRA_CHECK(cuda_available())
      << "pin_memory: no CUDA device, so there is no page-locked memory to use";
  Tensor c = contiguous();
  auto impl = std::make_shared<TensorImpl>();
  impl->storage = std::make_shared<StorageImpl>(c.nbytes(), cuda_pinned_allocator(), true);
  impl->shape = c.shape();
  impl->strides = contiguous_strides(c.shape());
  impl->dtype = c.dtype();
  Tensor out(std::move(impl));
  if (c.numel() > 0) std::memcpy(out.raw_data(), c.raw_data(), c.nbytes());
  return out;
}

void copy_to_host(const Tensor& src, const Tensor& dst) {
  HYDRA_CHECK(dst.device().is_cpu() && dst.is_contiguous() && dst.shape() == src.shape() &&
              dst.dtype() == src.dtype())
      << "copy_to_host: the destination must be a contiguous host tensor of "
      << shape_str(src.shape()) << " " << dtype_name(src.dtype());
  const Tensor s = src.detach().contiguous();
  if (s.numel() == 0) return;
  if (s.device().is_cpu()) {
    std::memcpy(dst.raw_data(), s.raw_data(), s.nbytes());
    return;
  }
#if HYDRA_WITH_CUDA
  void* stream = current_stream(s.device());
  kernels::cuda::memcpy_async(dst.raw_data(), s.raw_data(), s.nbytes(),
                              kernels::cuda::CopyKind::kDeviceToHost, stream);
  timed_wait([&] { kernels::cuda::stream_synchronize(stream); });
#endif
}

double host_copy_wait_seconds() {
#if HYDRA_WITH_CUDA
  return double(g_copy_wait_ns.load()) * 1e-9;
#else
  return 0;
#endif
}

bool Tensor::is_pinned() const { return defined() && storage() && storage()->pinned(); }

Tensor Tensor::contiguous() const {
  if (is_contiguous()) return *this;
  return clone();
}

Tensor Tensor::clone() const {
  Tensor out = Tensor::empty(shape(), dtype(), device());
  copy_same_device(out, *this);
  record_op("clone", {*this}, {out},
            [](const std::vector<Tensor>& g) { return std::vector<Tensor>{g[0]}; });
  return out;
}

Tensor Tensor::to(DType target) const {
  if (target == dtype()) return *this;
  Tensor out = Tensor::empty(shape(), target, device());
  copy_same_device(out, *this);
  if (is_floating(dtype()) && is_floating(target)) {
    const DType src = dtype();
    record_op("to_dtype", {*this}, {out},
              [src](const std::vector<Tensor>& g) { return std::vector<Tensor>{g[0].to(src)}; });
  }
  return out;
}

Tensor Tensor::to(Device target) const {
  if (target == device()) return *this;
  Tensor out = transfer(*this, target);
  const Device src = device();
  record_op("to_device", {*this}, {out},
            [src](const std::vector<Tensor>& g) { return std::vector<Tensor>{g[0].to(src)}; });
  return out;
}

Tensor& Tensor::fill_(double value) {
  check_inplace_allowed(*this, "fill_");
  if (numel() == 0) return *this;
  if (is_contiguous()) {
    kernels::FillParams p;
    p.dtype = dtype();
    p.dst = raw_data();
    p.n = numel();
    p.value = value;
    p.stream = current_stream(device());
    HYDRA_LAUNCH(device(), fill, p);
  } else {
    copy_same_device(*this, full({}, value, dtype(), device()).expand(shape()));
  }
  storage()->bump_version();
  return *this;
}

Tensor& Tensor::copy_(const Tensor& src) {
  check_inplace_allowed(*this, "copy_");
  HYDRA_CHECK(src.shape() == shape() || shape_numel(src.shape()) == 1)
      << "copy_: source shape " << shape_str(src.shape()) << " does not match destination shape "
      << shape_str(shape());
  Tensor s = src.detach();
  if (s.device() != device()) s = transfer(s, device());
  if (s.shape() != shape()) s = s.reshape({}).expand(shape());
  copy_same_device(*this, s);
  storage()->bump_version();
  return *this;
}

void copy_many_(const std::vector<Tensor>& dst, const std::vector<Tensor>& src) {
  HYDRA_CHECK(dst.size() == src.size())
      << "copy_many_: " << dst.size() << " destinations, " << src.size() << " sources";
  // Batches keyed by (device, src dtype, dst dtype), flushed when full and at the end.
  std::map<std::tuple<std::string, DType, DType>, kernels::MultiCopyParams> batches;
  auto flush = [](kernels::MultiCopyParams& p, const Device& device) {
    if (p.count == 0) return;
    p.stream = current_stream(device);
    HYDRA_LAUNCH(device, multi_copy, p);
    p.count = 0;
  };
  std::map<std::tuple<std::string, DType, DType>, Device> devices;
  for (std::size_t i = 0; i < dst.size(); ++i) {
    const Tensor &d = dst[i], &s = src[i];
    if (d.numel() == 0) continue;
    if (s.device() != d.device() || !s.is_contiguous() || !d.is_contiguous() ||
        s.shape() != d.shape() || (GradMode::enabled() && d.requires_grad())) {
      Tensor(d).copy_(s);  // the general path (and its checks)
      continue;
    }
    const auto key = std::make_tuple(d.device().str(), s.dtype(), d.dtype());
    kernels::MultiCopyParams& p = batches[key];
    devices.emplace(key, d.device());
    p.src_dtype = s.dtype();
    p.dst_dtype = d.dtype();
    p.src[p.count] = s.raw_data();
    p.dst[p.count] = d.raw_data();
    p.n[p.count] = d.numel();
    ++p.count;
    d.storage()->bump_version();
    if (p.count == kernels::MultiCopyParams::kMax) flush(p, d.device());
  }
  for (auto& [key, p] : batches) flush(p, devices.at(key));
}

Tensor& Tensor::mul_(double value) {
  check_inplace_allowed(*this, "mul_");
  HYDRA_CHECK(is_contiguous()) << "mul_: the destination must be contiguous";
  kernels::UnaryParams p;
  p.op = kernels::UnaryOp::kAffine;
  p.dtype = dtype();
  p.x = raw_data();
  p.y = raw_data();
  p.n = numel();
  p.alpha = value;
  p.stream = current_stream(device());
  HYDRA_LAUNCH(device(), unary_fwd, p);
  storage()->bump_version();
  return *this;
}

Tensor& Tensor::set_requires_grad(bool requires_grad) {
  HYDRA_CHECK(is_leaf()) << "set_requires_grad on a non-leaf tensor (use detach() first)";
  HYDRA_CHECK(!requires_grad || is_floating(dtype()))
      << "only floating tensors can require grad, not " << dtype_name(dtype());
  impl().autograd.requires_grad = requires_grad;
  return *this;
}

Tensor Tensor::grad() const {
  if (gradient_conversion_pending(impl().autograd.grad.get())) flush_gradient_conversions();
  return Tensor(impl().autograd.grad);
}

void Tensor::set_grad(const Tensor& grad) const {
  if (grad.defined()) {
    HYDRA_CHECK(grad.shape() == shape()) << "set_grad: gradient shape " << shape_str(grad.shape())
                                         << " does not match " << shape_str(shape());
    impl().autograd.grad = grad.detach().impl_ptr();
  } else {
    impl().autograd.grad.reset();
  }
}

void Tensor::set_grad_dtype(std::optional<DType> dtype) const {
  impl().autograd.grad_dtype = dtype;
  const Tensor g = grad();
  if (g.defined() && g.dtype() != grad_dtype()) impl().autograd.grad.reset();
}

void Tensor::set_grad_destination(const Tensor& dest) const {
  if (dest.defined()) {
    HYDRA_CHECK(dest.shape() == shape() && dest.dtype() == grad_dtype() &&
                dest.device() == device())
        << "set_grad_destination: " << shape_str(dest.shape()) << " " << dtype_name(dest.dtype())
        << " on " << dest.device().str() << " for a tensor " << shape_str(shape()) << " "
        << dtype_name(dtype()) << " on " << device().str();
    impl().autograd.grad_destination = dest.detach().impl_ptr();
  } else {
    impl().autograd.grad_destination.reset();
  }
  impl().autograd.grad_destination_claimed = false;
}

Tensor Tensor::claim_grad_destination(DType dtype) const {
  if (!defined()) return Tensor();
  AutogradMeta& m = impl().autograd;
  if (!m.requires_grad || m.grad_fn || !m.grad_destination || m.grad_destination_claimed ||
      m.grad || m.grad_destination->dtype != dtype)
    return Tensor();
  m.grad_destination_claimed = true;
  return Tensor(m.grad_destination);
}

bool Tensor::sole_owner() const {
  return impl_ != nullptr && impl_.use_count() == 1 && impl_->storage != nullptr &&
         impl_->storage.use_count() == 1;
}

Tensor Tensor::detach() const {
  return view_of(impl().storage, impl().offset, impl().shape, impl().strides, impl().dtype);
}

void Tensor::backward(const Tensor& grad, bool retain_graph) const {
  run_backward({*this}, {grad}, retain_graph);
}

int Tensor::add_grad_ready_hook(GradReadyHook hook) const {
  HYDRA_CHECK(is_leaf() && requires_grad())
      << "gradient-ready hooks go on leaves that require grad";
  auto& meta = impl().autograd;
  const int id = meta.next_hook_id++;
  meta.ready_hooks.emplace_back(id, std::move(hook));
  return id;
}

void Tensor::remove_grad_ready_hook(int id) const {
  auto& hooks = impl().autograd.ready_hooks;
  std::erase_if(hooks, [id](const auto& h) { return h.first == id; });
}

template <class T>
std::vector<T> Tensor::to_vector() const {
  Tensor c = detach().contiguous().to(Device::cpu()).contiguous();
  std::vector<T> out(c.numel());
  if (dtype_of<T> == c.dtype()) {
    if (!out.empty()) std::memcpy(out.data(), c.raw_data(), c.nbytes());
    return out;
  }
  Tensor conv = c.to(dtype_of<T>);
  if (!out.empty()) std::memcpy(out.data(), conv.raw_data(), conv.nbytes());
  return out;
}

template <class T>
T Tensor::item() const {
  HYDRA_CHECK(numel() == 1) << "item() of a tensor with " << numel() << " elements (shape "
                            << shape_str(shape()) << ")";
  return to_vector<T>()[0];
}

template std::vector<float> Tensor::to_vector<float>() const;
template std::vector<double> Tensor::to_vector<double>() const;
template std::vector<int32_t> Tensor::to_vector<int32_t>() const;
template std::vector<int64_t> Tensor::to_vector<int64_t>() const;
template std::vector<bf16> Tensor::to_vector<bf16>() const;
template float Tensor::item<float>() const;
template double Tensor::item<double>() const;
template int32_t Tensor::item<int32_t>() const;
template int64_t Tensor::item<int64_t>() const;

template <class T>
Tensor tensor(const std::vector<T>& values, const Shape& shape, Device device) {
  HYDRA_CHECK(static_cast<int64_t>(values.size()) == shape_numel(shape))
      << "tensor(): " << values.size() << " values for shape " << shape_str(shape);
  Tensor t = Tensor::empty(shape, dtype_of<T>, Device::cpu());
  if (!values.empty()) std::memcpy(t.raw_data(), values.data(), values.size() * sizeof(T));
  return t.to(device);
}

template Tensor tensor<float>(const std::vector<float>&, const Shape&, Device);
template Tensor tensor<double>(const std::vector<double>&, const Shape&, Device);
template Tensor tensor<int32_t>(const std::vector<int32_t>&, const Shape&, Device);
template Tensor tensor<int64_t>(const std::vector<int64_t>&, const Shape&, Device);
template Tensor tensor<bf16>(const std::vector<bf16>&, const Shape&, Device);

std::string Tensor::str() const {
  if (!defined()) return "Tensor(undefined)";
  std::ostringstream os;
  os << "Tensor" << shape_str(shape()) << " " << dtype_name(dtype()) << " " << device().str();
  if (numel() <= 64 && numel() > 0) {
    os << " {";
    const std::vector<double> v =
        is_floating(dtype()) ? to_vector<double>() : std::vector<double>();
    if (is_floating(dtype())) {
      for (std::size_t i = 0; i < v.size(); ++i) os << (i ? ", " : "") << v[i];
    } else {
      const std::vector<int64_t> iv = to_vector<int64_t>();
      for (std::size_t i = 0; i < iv.size(); ++i) os << (i ? ", " : "") << iv[i];
    }
    os << "}";
  }
  return os.str();
}

std::ostream& operator<<(std::ostream& os, const Tensor& t) { return os << t.str(); }

const std::shared_ptr<SparseRows>& Tensor::sparse_grad() const {
  const std::shared_ptr<SparseRows>& g = impl().autograd.sparse_grad;
  if (g && g->pending) {
    auto resolve = std::move(g->pending);
    g->pending = nullptr;
    resolve(*g);
    g->dense = Tensor();
    g->hits = Tensor();
  }
  return g;
}

PendingHostCopy::PendingHostCopy(const Tensor& src_in) {
  const Tensor src = src_in.detach().contiguous();
  if (src.device().is_cpu() || src.numel() == 0) {
    host_ = src.cpu().clone();
    ready_ = true;
    return;
  }
#if HYDRA_WITH_CUDA
  host_ = Tensor::empty_pinned(src.shape(), src.dtype());
  void* stream = current_stream(src.device());
  kernels::cuda::memcpy_async(host_.raw_data(), src.raw_data(), src.nbytes(),
                              kernels::cuda::CopyKind::kDeviceToHost, stream);
  event_ = kernels::cuda::event_create();
  kernels::cuda::event_record(event_, stream);
#endif
}

PendingHostCopy::~PendingHostCopy() {
#if HYDRA_WITH_CUDA
  if (event_ != nullptr) {
    kernels::cuda::event_synchronize(event_);  // the copy must not outlive its pinned buffer
    kernels::cuda::event_destroy(event_);
  }
#endif
}

const Tensor& PendingHostCopy::host() {
  if (ready_) return host_;
#if HYDRA_WITH_CUDA
  if (!kernels::cuda::event_query(event_)) {
    std::optional<KernelProfileScope> wait;
    if (kernel_profile_enabled()) wait.emplace(Device::cpu(), "host: wait for a copy to the host");
    timed_wait([&] { kernels::cuda::event_synchronize(event_); });
  }
#endif
  ready_ = true;
  return host_;
}

const std::vector<int64_t>& PendingHostCopy::get() {
  HYDRA_CHECK(host_.dtype() == DType::kI64)
      << "PendingHostCopy::get: an i64 tensor's values; this one is " << dtype_name(host_.dtype());
  if (!have_values_) {
    values_ = host().to_vector<int64_t>();
    have_values_ = true;
  }
  return values_;
}

}  // namespace hydra
