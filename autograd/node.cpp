#include "autograd/node.h"

#include <atomic>
#include <limits>
#include <mutex>
#include <unordered_set>
#include <utility>

#include "autograd/grad_mode.h"
#include "autograd/ops.h"
#include "autograd/profiler.h"

namespace hydra {
namespace {
std::atomic<uint64_t> next_sequence_nr{0};

// The queued gradient conversions (flush_gradient_conversions).
struct PendingConversions {
  std::mutex mu;
  std::vector<Tensor> dst, src;
  std::unordered_set<const void*> storages;  // the destinations' storages
  int64_t src_bytes = 0;
  std::atomic<int64_t> count{0};
};
PendingConversions& pending_conversions() {
  static PendingConversions p;
  return p;
}
constexpr int64_t kMaxPendingConversionBytes = int64_t{64} << 20;

// Queues dst.copy_(src) (dst a leaf's new .grad, contiguous, of another dtype than src).
void defer_conversion(const Tensor& dst, const Tensor& src) {
  PendingConversions& p = pending_conversions();
  bool full = false;
  {
    const std::lock_guard<std::mutex> lock(p.mu);
    p.dst.push_back(dst);
    p.src.push_back(src);
    p.storages.insert(dst.storage().get());
    p.src_bytes += src.numel() * static_cast<int64_t>(dtype_size(src.dtype()));
    p.count.store(static_cast<int64_t>(p.dst.size()), std::memory_order_release);
    full = p.src_bytes > kMaxPendingConversionBytes;
  }
  if (full) flush_gradient_conversions();
}
}  // namespace

void flush_gradient_conversions() {
  PendingConversions& p = pending_conversions();
  if (p.count.load(std::memory_order_acquire) == 0) return;
  std::vector<Tensor> dst, src;
  {
    const std::lock_guard<std::mutex> lock(p.mu);
    dst.swap(p.dst);
    src.swap(p.src);
    p.storages.clear();
    p.src_bytes = 0;
    p.count.store(0, std::memory_order_release);
  }
  NoGradGuard no_grad;
  copy_many_(dst, src);
}

bool gradient_conversion_pending(const TensorImpl* grad) {
  PendingConversions& p = pending_conversions();
  if (grad == nullptr || !grad->storage || p.count.load(std::memory_order_acquire) == 0)
    return false;
  const std::lock_guard<std::mutex> lock(p.mu);
  return p.storages.count(grad->storage.get()) > 0;
}

Node::Node(std::string name) : name_(std::move(name)), sequence_nr_(next_sequence_nr.fetch_add(1)) {
  kernel_profile_node_created(name_);
}

Tensor SavedTensor::get() const {
  if (!tensor_.defined()) return tensor_;
  HYDRA_CHECK(tensor_.version() == version_)
      << "a tensor saved for backward was modified in place after it was saved (version "
      << tensor_.version() << ", saved at " << version_ << "); make a copy before changing it";
  return tensor_;
}

std::vector<Tensor> FunctionNode::apply(std::vector<Tensor>&& grads) {
  HYDRA_CHECK(fn_ != nullptr)
      << "backward through " << name()
      << " a second time: its saved tensors were freed (pass retain_graph = true)";
  return fn_(grads);
}

AccumulateGrad::AccumulateGrad(const Tensor& leaf) : Node("AccumulateGrad"), leaf_(leaf) {
  set_sequence_nr(std::numeric_limits<uint64_t>::max());  // run as soon as ready
}

std::vector<Tensor> AccumulateGrad::apply(std::vector<Tensor>&& grads) {
  Tensor g = std::move(grads[0]);
  if (!g.defined()) return {};
  HYDRA_CHECK(g.shape() == leaf_.shape()) << "gradient of shape " << shape_str(g.shape())
                                          << " for a leaf of shape " << shape_str(leaf_.shape());
  Tensor current = leaf_.grad();  // (a pending conversion of it is flushed first)
  const auto& dest = leaf_.unsafe_impl()->autograd.grad_destination;
  if (!current.defined() && dest) {
    NoGradGuard no_grad;
    Tensor d(dest);
    // Written there already by the op that claimed the destination; otherwise copied (and converted
    // from the compute dtype: queued with the others).
    const bool there =
        g.storage() == d.storage() && g.offset() == d.offset() && g.strides() == d.strides();
    if (!there) {
      if (g.dtype() != d.dtype() && d.is_contiguous())
        defer_conversion(d, g);
      else
        d.copy_(g);
    }
    leaf_.set_grad(d);
  } else if (!current.defined()) {
    // Take the incoming buffer when nothing else refers to it; otherwise copy, so that no two
    // leaves' .grad share memory (a pass-through backward such as add's hands one tensor to both
    // inputs).
    const bool sole_owner = g.storage().use_count() == 1 && g.impl_ptr().use_count() == 1 &&
                            g.is_contiguous() && g.offset() == 0;
    if (g.dtype() != leaf_.grad_dtype()) {  // a conversion: a new buffer, written later
      const Tensor d = Tensor::empty(g.shape(), leaf_.grad_dtype(), g.device());
      defer_conversion(d, g);
      leaf_.set_grad(d);
    } else {
      leaf_.set_grad(sole_owner ? g : g.clone());
    }
  } else {
    NoGradGuard no_grad;
    current.add_(g.dtype() == current.dtype() ? g : g.to(current.dtype()));
  }
  run_grad_ready_hooks(leaf_);
  return {};
}

void run_grad_ready_hooks(const Tensor& leaf) {
  // Copy: a hook may add or remove hooks.
  const auto hooks = leaf.unsafe_impl()->autograd.ready_hooks;
  for (const auto& [id, hook] : hooks) hook(leaf);
}

bool any_requires_grad(const std::vector<Tensor>& inputs) {
  if (!GradMode::enabled()) return false;
  for (const Tensor& t : inputs)
    if (t.defined() && t.requires_grad()) return true;
  return false;
}

Edge gradient_edge(const Tensor& t) {
  if (!t.defined() || !t.requires_grad()) return {};
  auto& meta = t.unsafe_impl()->autograd;
  if (meta.grad_fn) return {meta.grad_fn, meta.output_nr};
  std::shared_ptr<Node> acc = meta.grad_accumulator.lock();
  if (!acc) {
    acc = std::make_shared<AccumulateGrad>(t);
    meta.grad_accumulator = acc;
  }
  return {acc, 0};
}

namespace {

void record_node(const std::string& name, const std::vector<Tensor>& inputs,
                 const std::vector<Tensor>& outputs, BackwardFn fn, bool collective);

}  // namespace

void record_op(const std::string& name, const std::vector<Tensor>& inputs,
               const std::vector<Tensor>& outputs, BackwardFn fn, bool force) {
  if (!(force ? GradMode::enabled() : any_requires_grad(inputs))) return;
  record_node(name, inputs, outputs, std::move(fn), false);
}

namespace {
thread_local std::vector<Tensor> t_collective_outputs;
}  // namespace

void record_collective_op(const std::string& name, const std::vector<Tensor>& inputs,
                          const std::vector<Tensor>& outputs, BackwardFn fn) {
  if (!GradMode::enabled()) return;
  record_node(name, inputs, outputs, std::move(fn), true);
  for (const Tensor& o : outputs)
    if (o.defined()) {
      t_collective_outputs.push_back(o);
      break;
    }
}

std::vector<Tensor> take_collective_outputs() { return std::exchange(t_collective_outputs, {}); }

void put_collective_outputs(std::vector<Tensor> outputs) {
  t_collective_outputs.insert(t_collective_outputs.end(), outputs.begin(), outputs.end());
}

Tensor anchor_collectives(const Tensor& root, const std::vector<Tensor>& anchors) {
  if (anchors.empty() || !GradMode::enabled()) return root;
  Tensor out = root.detach();
  std::vector<Tensor> inputs{root};
  inputs.insert(inputs.end(), anchors.begin(), anchors.end());
  const std::size_t n = inputs.size();
  record_op(
      "anchor_collectives", inputs, {out},
      [n](const std::vector<Tensor>& g) {
        std::vector<Tensor> grads(n);
        grads[0] = g[0];
        return grads;
      },
      true);
  return out;
}

namespace {

void record_node(const std::string& name, const std::vector<Tensor>& inputs,
                 const std::vector<Tensor>& outputs, BackwardFn fn, bool collective) {
  auto node = std::make_shared<FunctionNode>(name, std::move(fn));
  node->set_runs_without_grads(collective);
  node->set_num_outputs(static_cast<uint32_t>(outputs.size()));
  std::vector<Edge> edges;
  edges.reserve(inputs.size());
  for (const Tensor& in : inputs) edges.push_back(gradient_edge(in));
  node->set_next_edges(std::move(edges));
  for (std::size_t i = 0; i < outputs.size(); ++i) {
    if (!outputs[i].defined()) continue;
    auto& meta = outputs[i].unsafe_impl()->autograd;
    HYDRA_CHECK(meta.grad_fn == nullptr) << name << ": output " << i << " already has a history";
    meta.requires_grad = true;
    meta.grad_fn = node;
    meta.output_nr = static_cast<uint32_t>(i);
  }
}

}  // namespace

}  // namespace hydra
