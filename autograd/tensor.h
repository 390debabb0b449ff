// Tensor: a handle to (storage, offset, shape, strides, dtype) plus its autograd record. Copies of
// a Tensor share the same tensor; views share storage. Strides and offsets count elements.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include "autograd/device.h"
#include "autograd/storage.h"
#include "base/check.h"
#include "base/dtype.h"

namespace hydra {

class Node;
class Tensor;
struct TensorImpl;

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& shape);
int64_t shape_numel(const Shape& shape);
Shape contiguous_strides(const Shape& shape);

// Called once the gradient of a leaf is complete for this backward pass (after accumulation into
// .grad): the signal data parallelism uses to start reducing a bucket while backward goes on.
using GradReadyHook = std::function<void(const Tensor& leaf)>;

// A row-sparse gradient of a 2-D leaf: rows (i64 [m], unique, ascending) and their values [m,
// cols]. Used for large tables read a few rows at a time (PKM values); see embedding_bag().
struct SparseRows;

struct AutogradMeta {
  bool requires_grad = false;
  std::shared_ptr<TensorImpl> grad;
  std::shared_ptr<SparseRows> sparse_grad;
  std::shared_ptr<Node> grad_fn;  // null for leaves
  uint32_t output_nr = 0;         // which output of grad_fn this tensor is
  std::weak_ptr<Node> grad_accumulator;
  std::vector<std::pair<int, GradReadyHook>> ready_hooks;
  // Where a leaf's first gradient of a backward is written when it has none yet (a view into a
  // communication bucket: the gradient then lives there, with no copy later); .grad becomes it.
  std::shared_ptr<TensorImpl> grad_destination;
  // An op's backward has written this backward's gradient straight into grad_destination
  // (claim_grad_destination); AccumulateGrad then finds it there.
  bool grad_destination_claimed = false;
  // The dtype a leaf's gradient accumulates in when it differs from the leaf's (a low-precision
  // compute copy whose master is fp32: autograd/compute_copies.h); unset: the leaf's own dtype.
  std::optional<DType> grad_dtype;
  int next_hook_id = 0;
};

struct TensorImpl {
  Storage storage;
  int64_t offset = 0;
  Shape shape;
  Shape strides;
  DType dtype = DType::kF32;
  AutogradMeta autograd;
};

class Tensor {
 public:
  Tensor() = default;
  explicit Tensor(std::shared_ptr<TensorImpl> impl) : impl_(std::move(impl)) {}

  // A new tensor over fresh storage (uninitialised).
  static Tensor empty(const Shape& shape, DType dtype = DType::kF32, Device device = Device::cpu());
  // Uninitialized page-locked host memory (copies from a GPU into it run at full speed, without
  // the driver's staging); plain host memory when no CUDA device is present.
  static Tensor empty_pinned(const Shape& shape, DType dtype = DType::kF32);
  // A view of `storage` (no copy).
  static Tensor view_of(Storage storage, int64_t offset, Shape shape, Shape strides, DType dtype);

  bool defined() const { return impl_ != nullptr; }
  const Shape& shape() const { return impl().shape; }
  const Shape& strides() const { return impl().strides; }
  int64_t dim() const { return static_cast<int64_t>(impl().shape.size()); }
  int64_t size(int64_t d) const;  // negative d counts from the end
  int64_t stride(int64_t d) const;
  int64_t offset() const { return impl().offset; }
  int64_t numel() const { return shape_numel(impl().shape); }
  int64_t nbytes() const { return numel() * dtype_size(dtype()); }
  DType dtype() const { return impl().dtype; }
  Device device() const { return impl().storage ? impl().storage->device() : Device::cpu(); }
  const Storage& storage() const { return impl().storage; }
  bool is_contiguous() const;
  bool is_same(const Tensor& o) const { return impl_ == o.impl_; }
  uint32_t version() const { return impl().storage ? impl().storage->version() : 0; }
  TensorImpl* unsafe_impl() const { return impl_.get(); }
  // No other Tensor handle, view or saved copy refers to this tensor's storage (it may be written
  // in place unseen).
  bool sole_owner() const;
  const std::shared_ptr<TensorImpl>& impl_ptr() const { return impl_; }

  // Address of element 0 (storage base + offset).
  void* raw_data() const;
  template <class T>
  T* data() const {
    HYDRA_CHECK(dtype_of<T> == dtype())
        << "data<" << dtype_name(dtype_of<T>) << ">() on a " << dtype_name(dtype()) << " tensor";
    return static_cast<T*>(raw_data());
  }
  // Single value (copied to the host, converted to T).
  template <class T>
  T item() const;
  // All values in row-major order (copied to the host, converted to T).
  template <class T>
  std::vector<T> to_vector() const;

  // Views (no copy; differentiable).
  Tensor reshape(const Shape& shape) const;  // one entry may be -1; copies only if not viewable
  Tensor view(const Shape& shape) const;     // requires a contiguous tensor
  Tensor flatten(int64_t start = 0, int64_t end = -1) const;
  Tensor transpose(int64_t d0, int64_t d1) const;
  Tensor permute(const std::vector<int64_t>& dims) const;
  Tensor narrow(int64_t dim, int64_t start, int64_t length) const;
  Tensor slice(int64_t dim, int64_t start, int64_t end, int64_t step = 1) const;
  Tensor select(int64_t dim, int64_t index) const;
  Tensor unsqueeze(int64_t dim) const;
  Tensor squeeze(int64_t dim) const;
  Tensor expand(const Shape& shape) const;  // broadcast to `shape` with zero strides

  // Copies (differentiable).
  Tensor contiguous() const;
  Tensor clone() const;
  Tensor to(DType dtype) const;
  Tensor to(Device device) const;
  Tensor cpu() const { return to(Device::cpu()); }
  // A copy in page-locked host memory (CPU tensors; needs the CUDA backend): copies from it to a
  // GPU are asynchronous. Returns *this when already pinned.
  Tensor pin_memory() const;
  bool is_pinned() const;

  // In place (no autograd: not allowed on a tensor that requires grad while grad mode is on).
  Tensor& fill_(double value);
  Tensor& zero_() { return fill_(0.0); }
  Tensor& copy_(const Tensor& src);  // same shape; converts dtype and device
  Tensor& add_(const Tensor& other, double alpha = 1.0);
  Tensor& mul_(double value);

  // Autograd.
  bool requires_grad() const { return impl().autograd.requires_grad; }
  Tensor& set_requires_grad(bool requires_grad);  // leaves only
  bool is_leaf() const { return impl().autograd.grad_fn == nullptr; }
  const std::shared_ptr<Node>& grad_fn() const { return impl().autograd.grad_fn; }
  uint32_t output_nr() const { return impl().autograd.output_nr; }
  Tensor grad() const;
  void set_grad(const Tensor& grad) const;
  // Leaves: the next gradient that finds .grad undefined is copied into `dest` (this tensor's shape
  // and dtype; undefined: none) and .grad becomes `dest`.
  void set_grad_destination(const Tensor& dest) const;
  // For an op's backward that can compute this leaf's gradient in place: the destination, when the
  // leaf has one of `dtype`, no gradient yet, and no other op has claimed it (so no two writers);
  // the op writes the whole gradient there and returns that tensor. Undefined otherwise.
  Tensor claim_grad_destination(DType dtype) const;
  // The dtype gradients of this leaf accumulate in (its own unless set; `set_grad_dtype` drops a
  // gradient of another dtype).
  DType grad_dtype() const { return impl().autograd.grad_dtype.value_or(dtype()); }
  void set_grad_dtype(std::optional<DType> dtype) const;
  Tensor detach() const;  // shares storage, no history
  // Resolves a pending sparse gradient (SparseRows::pending) on first read.
  const std::shared_ptr<SparseRows>& sparse_grad() const;
  // The sparse gradient as it is, pending or not (SparseRows::dense).
  const std::shared_ptr<SparseRows>& sparse_grad_as_is() const {
    return impl().autograd.sparse_grad;
  }
  void set_sparse_grad(std::shared_ptr<SparseRows> g) const {
    impl().autograd.sparse_grad = std::move(g);
  }
  // Backpropagates from this tensor; `grad` defaults to 1 for a single-element tensor.
  void backward(const Tensor& grad = Tensor(), bool retain_graph = false) const;
  int add_grad_ready_hook(GradReadyHook hook) const;
  void remove_grad_ready_hook(int id) const;

  std::string str() const;  // shape, dtype, device and (small tensors) values

 private:
  TensorImpl& impl() const {
    HYDRA_CHECK(impl_ != nullptr) << "use of an undefined tensor";
    return *impl_;
  }
  std::shared_ptr<TensorImpl> impl_;
};

std::ostream& operator<<(std::ostream& os, const Tensor& t);

struct SparseRows {
  Tensor rows;    // i64 [m], unique, ascending
  Tensor values;  // [m, cols]
  // Set while rows and values are not computed yet: the first Tensor::sparse_grad() computes them
  // (the embedding bag's backward leaves its row count on the device until then, so the host
  // does not wait for the device in the middle of the backward).
  std::function<void(SparseRows&)> pending;
  // While pending, the embedding bag also leaves the whole table's gradient (`dense`: the table's
  // shape and compute dtype, zero in the rows not hit) and which rows were hit (`hits`, i32
  // [rows]): the optimizer and the gradient norm read these without waiting for the device
  // (anything else resolves the rows, which clears them).
  Tensor dense, hits;
};

// Copies `src` (any device) into `dst`, a contiguous host tensor of src's shape and dtype, and
// returns when it is there. From a GPU into page-locked memory (Tensor::empty_pinned) the copy runs
// without a staging buffer (checkpoint snapshots).
void copy_to_host(const Tensor& src, const Tensor& dst);

// A tensor holding `values` (copied) on `device`.
// dst[i].copy_(src[i]) for every i (same shapes): pairs that are contiguous and on one device go
// in one launch per device and dtype pair (kernels/copy.h multi_copy), the rest one at a time.
void copy_many_(const std::vector<Tensor>& dst, const std::vector<Tensor>& src);

template <class T>
Tensor tensor(const std::vector<T>& values, const Shape& shape, Device device = Device::cpu());

// The host's time spent waiting for copies from a device (to(cpu), copy_to_host, PendingHostCopy),
// in seconds, summed since the process started: the trainer tells a step's host work from its
// waits with it.
double host_copy_wait_seconds();

// A copy of a small device tensor to the host that runs behind the work queued so far: host()
// returns it (get(): an i64 tensor's values), waiting only for what the copy still lacks (a caller
// that asks late, as a backward asking for the forward's counts, does not wait at all; the trainer
// reads a step's losses while the next step is queued behind them). On the CPU the values are
// copied at once.
class PendingHostCopy {
 public:
  explicit PendingHostCopy(const Tensor& src);
  ~PendingHostCopy();
  PendingHostCopy(const PendingHostCopy&) = delete;
  PendingHostCopy& operator=(const PendingHostCopy&) = delete;
  const Tensor& host();  // contiguous, on the CPU
  const std::vector<int64_t>& get();

 private:
  Tensor host_;  // pinned when the source is on a GPU
  void* event_ = nullptr;
  bool ready_ = false, have_values_ = false;
  std::vector<int64_t> values_;
};

}  // namespace hydra
