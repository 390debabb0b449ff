// The backward graph. A Node is the backward of one forward op: it receives the gradients of the
// op's outputs (undefined = zero) and returns the gradients of its inputs, routed along next_edges.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "autograd/tensor.h"

namespace hydra {

class Node;

struct Edge {
  std::shared_ptr<Node> node;  // null: the input needs no gradient
  uint32_t input_nr = 0;       // which of node's gradient inputs this edge feeds
  bool valid() const { return node != nullptr; }
};

class Node : public std::enable_shared_from_this<Node> {
 public:
  explicit Node(std::string name);
  virtual ~Node() = default;
  Node(const Node&) = delete;
  Node& operator=(const Node&) = delete;

  // grads.size() == num_outputs(); returns one entry per next edge (undefined where no gradient).
  virtual std::vector<Tensor> apply(std::vector<Tensor>&& grads) = 0;
  // Frees saved tensors once the node has run without retain_graph.
  virtual void release_saved() {}

  const std::string& name() const { return name_; }
  uint64_t sequence_nr() const { return sequence_nr_; }
  uint32_t num_outputs() const { return num_outputs_; }
  void set_num_outputs(uint32_t n) { num_outputs_ = n; }
  const std::vector<Edge>& next_edges() const { return next_edges_; }
  void set_next_edges(std::vector<Edge> edges) { next_edges_ = std::move(edges); }
  // Collectives: the backward must run on every rank even when no gradient reached this node here
  // (it then receives undefined gradients), or the other ranks would wait for it forever.
  bool runs_without_grads() const { return runs_without_grads_; }
  void set_runs_without_grads(bool on) { runs_without_grads_ = on; }
  // An op that keeps its one input's elements in their order (view, reshape, squeeze, unsqueeze):
  // its backward is its gradient reshaped, so the engine may let the op that feeds it add straight
  // into its input's gradient sum (gradient_sum_target) and skip it.
  bool flat_view() const { return flat_view_; }
  void set_flat_view(bool on) { flat_view_ = on; }

 protected:
  void set_sequence_nr(uint64_t nr) { sequence_nr_ = nr; }

 private:
  std::string name_;
  uint64_t sequence_nr_;
  uint32_t num_outputs_ = 1;
  bool runs_without_grads_ = false;
  bool flat_view_ = false;
  std::vector<Edge> next_edges_;
};

// A tensor saved for backward: detached (no reference cycle through grad_fn) and stamped with its
// storage version, so an in-place change before backward is reported instead of giving wrong grads.
class SavedTensor {
 public:
  SavedTensor() = default;
  explicit SavedTensor(const Tensor& t)
      : tensor_(t.defined() ? t.detach() : Tensor()), version_(t.defined() ? t.version() : 0) {}
  Tensor get() const;
  bool defined() const { return tensor_.defined(); }
  void reset() { tensor_ = Tensor(); }

 private:
  Tensor tensor_;
  uint32_t version_ = 0;
};

// A backward given as a function; saved state lives in its captures and is dropped by
// release_saved().
using BackwardFn = std::function<std::vector<Tensor>(const std::vector<Tensor>& grads)>;

class FunctionNode final : public Node {
 public:
  FunctionNode(std::string name, BackwardFn fn) : Node(std::move(name)), fn_(std::move(fn)) {}
  std::vector<Tensor> apply(std::vector<Tensor>&& grads) override;
  void release_saved() override { fn_ = nullptr; }

 private:
  BackwardFn fn_;
};

// Accumulates the gradient of a leaf into its .grad, then runs the leaf's gradient-ready hooks.
class AccumulateGrad final : public Node {
 public:
  explicit AccumulateGrad(const Tensor& leaf);
  std::vector<Tensor> apply(std::vector<Tensor>&& grads) override;
  const Tensor& leaf() const { return leaf_; }

 private:
  Tensor leaf_;
};

// True when grad mode is on and any input requires grad.
bool any_requires_grad(const std::vector<Tensor>& inputs);
// The edge by which gradient reaches `t` (its grad_fn, or its leaf accumulator; none if no grad).
Edge gradient_edge(const Tensor& t);
// Records `fn` as the backward of an op with these inputs and outputs. Undefined inputs get no
// edge; outputs become non-leaves that require grad. No-op when no input requires grad (or grad
// mode off), unless `force` (an op whose gradient leaves by another route, such as a sparse table
// gradient).
void record_op(const std::string& name, const std::vector<Tensor>& inputs,
               const std::vector<Tensor>& outputs, BackwardFn fn, bool force = false);
// record_op for a collective (parallel/): recorded whenever grad mode is on, and its backward runs
// on every backward that reaches it, with undefined gradients where none arrived.
void record_collective_op(const std::string& name, const std::vector<Tensor>& inputs,
                          const std::vector<Tensor>& outputs, BackwardFn fn);
// The outputs of the collective ops recorded on this thread since the last take (one per op). A
// rank may not use some collective's output (rank 0 has no predecessor to take a halo from), yet
// its backward must run on every rank, in the same order: the loss anchors them all
// (anchor_collectives), and since the engine runs reachable nodes in reverse creation order, every
// rank then runs the same collectives in the same order.
std::vector<Tensor> take_collective_outputs();
void put_collective_outputs(std::vector<Tensor> outputs);  // restores what take returned (appends)
// `root` unchanged, with `anchors` as extra inputs that receive no gradient: a backward from the
// result reaches every anchor's history.
Tensor anchor_collectives(const Tensor& root, const std::vector<Tensor>& anchors);
// Runs the gradient-ready hooks of a leaf (after a gradient reached it by any route).
void run_grad_ready_hooks(const Tensor& leaf);

// A leaf's first gradient of a backward that arrives in another dtype than the one it accumulates
// in (a bf16 compute copy's gradient, an fp32 .grad: autograd/compute_copies.h) is converted later,
// together with the others, in one multi_copy launch per 256 (kernels/copy.h) instead of one copy
// per parameter: the leaf's .grad is set at once, its values are written when
// flush_gradient_conversions runs. That happens before anything reads them: at the end of every
// backward, when Tensor::grad() returns a pending gradient, before a second gradient adds to one,
// when the queued sources pass 64 MB, and wherever code reads gradient storage directly (the
// data-parallel reducer, before a bucket's reduction).
void flush_gradient_conversions();
// Whether `grad` (a .grad's impl) may still wait for its conversion (one queued into its storage).
bool gradient_conversion_pending(const TensorImpl* grad);

}  // namespace hydra
