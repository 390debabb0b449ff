#include "autograd/engine.h"

#include <queue>
#include <unordered_map>
#include <unordered_set>

#include "autograd/grad_mode.h"
#include "autograd/node.h"
#include "autograd/ops.h"
#include "autograd/profiler.h"

namespace hydra {
namespace {

struct ByPriority {
  bool operator()(const std::shared_ptr<Node>& a, const std::shared_ptr<Node>& b) const {
    return a->sequence_nr() < b->sequence_nr();
  }
};

// The running node's inputs' partial sums (gradient_sum_target), per input: the engine's buffer
// slot or null, whether it is reached through a flat view (Node::flat_view: the slot is the view's
// input's sum, offered in the running node's shape), and whether the op claimed it.
struct SumTargets {
  std::vector<Tensor*> slots;
  std::vector<char> through, claimed;
};
thread_local SumTargets* t_sum_targets = nullptr;

// Sets the running node's targets for the scope (nested backwards restore the outer ones).
class SumTargetsScope {
 public:
  explicit SumTargetsScope(SumTargets* t) : prev_(t_sum_targets) { t_sum_targets = t; }
  ~SumTargetsScope() { t_sum_targets = prev_; }
  SumTargetsScope(const SumTargetsScope&) = delete;
  SumTargetsScope& operator=(const SumTargetsScope&) = delete;

 private:
  SumTargets* prev_;
};

void accumulate(std::vector<Tensor>& buffer, uint32_t slot, const Tensor& g) {
  if (!g.defined()) return;
  Tensor& cur = buffer[slot];
  cur = cur.defined() ? add(cur, g) : g;
}

}  // namespace

Tensor gradient_sum_target(std::size_t input, const Shape& shape, DType dtype, Device device,
                           std::size_t alignment) {
  SumTargets* st = t_sum_targets;
  if (st == nullptr || input >= st->slots.size() || st->slots[input] == nullptr ||
      st->claimed[input] != 0)
    return Tensor();
  const Tensor& t = *st->slots[input];
  const bool through = st->through[input] != 0;
  if (!t.defined() || (through ? t.numel() != shape_numel(shape) : t.shape() != shape) ||
      t.dtype() != dtype || t.device() != device || !t.is_contiguous() || !t.sole_owner() ||
      reinterpret_cast<std::uintptr_t>(t.raw_data()) % alignment != 0)
    return Tensor();
  st->claimed[input] = 1;
  return through ? t.view(shape) : t;
}

void run_backward(const std::vector<Tensor>& roots, const std::vector<Tensor>& grads,
                  bool retain_graph) {
  HYDRA_CHECK(roots.size() == grads.size())
      << "backward: " << roots.size() << " roots but " << grads.size() << " gradients";
  NoGradGuard no_grad;

  std::unordered_map<Node*, std::vector<Tensor>> buffers;
  std::unordered_map<Node*, int> pending;  // gradient inputs not yet received
  std::vector<std::shared_ptr<Node>> root_nodes;
  for (std::size_t i = 0; i < roots.size(); ++i) {
    const Tensor& root = roots[i];
    HYDRA_CHECK(root.defined() && root.requires_grad())
        << "backward: root " << i
        << " does not require grad (it has no history and is not a leaf that requires grad)";
    Tensor g = grads[i];
    if (!g.defined()) {
      HYDRA_CHECK(root.numel() == 1)
          << "backward: the gradient may be omitted only for a single-element root, got shape "
          << shape_str(root.shape());
      g = ones_like(root);
    }
    HYDRA_CHECK(g.shape() == root.shape())
        << "backward: gradient shape " << shape_str(g.shape()) << " does not match root shape "
        << shape_str(root.shape());
    const Edge e = gradient_edge(root);
    auto& buf = buffers[e.node.get()];
    buf.resize(e.node->num_outputs());
    accumulate(buf, e.input_nr, g);
    root_nodes.push_back(e.node);
  }

  // Count, for each node reachable from the roots, the edges that lead into it.
  std::unordered_set<Node*> seen;
  std::vector<Node*> stack;
  for (const auto& n : root_nodes)
    if (seen.insert(n.get()).second) stack.push_back(n.get());
  while (!stack.empty()) {
    Node* n = stack.back();
    stack.pop_back();
    for (const Edge& e : n->next_edges()) {
      if (!e.valid()) continue;
      ++pending[e.node.get()];
      if (seen.insert(e.node.get()).second) stack.push_back(e.node.get());
    }
  }

  std::priority_queue<std::shared_ptr<Node>, std::vector<std::shared_ptr<Node>>, ByPriority> ready;
  std::unordered_set<Node*> queued;
  for (const auto& n : root_nodes)
    if (pending[n.get()] == 0 && queued.insert(n.get()).second) ready.push(n);

  while (!ready.empty()) {
    std::shared_ptr<Node> node = ready.top();
    ready.pop();
    std::vector<Tensor> in = std::move(buffers[node.get()]);
    buffers.erase(node.get());
    in.resize(node->num_outputs());
    bool any = false;
    for (const Tensor& t : in) any = any || t.defined();

    // The partial sums already held for the node's inputs, offered to its backward
    // (gradient_sum_target); an input reached by two of its edges gets none. An input that is a
    // flat view whose only gradient comes from this node is looked through (a chain of them, to
    // the first that is not): the sum of what it views is offered (the views then receive nothing
    // and are skipped, that sum already holding this node's part).
    const auto& inputs = node->next_edges();
    SumTargets targets;
    targets.slots.assign(inputs.size(), nullptr);
    targets.through.assign(inputs.size(), 0);
    targets.claimed.assign(inputs.size(), 0);
    auto reached_twice = [&](std::size_t i, const Edge& e) {
      for (std::size_t j = 0; j < inputs.size(); ++j)
        if (j != i && inputs[j].node == e.node && inputs[j].input_nr == e.input_nr) return true;
      return false;
    };
    for (std::size_t i = 0; i < inputs.size(); ++i) {
      if (!inputs[i].valid()) continue;
      Edge e = inputs[i];
      bool through = false;
      for (Node* view = e.node.get();
           view->flat_view() && pending[view] == 1 && view->next_edges().size() == 1 &&
           view->next_edges()[0].valid() && !buffers.contains(view);
           view = e.node.get()) {
        e = view->next_edges()[0];
        through = true;
      }
      const auto it = buffers.find(e.node.get());
      if (it == buffers.end() || e.input_nr >= it->second.size()) continue;
      if (reached_twice(i, inputs[i]) || (through && reached_twice(i, e))) continue;
      targets.slots[i] = &it->second[e.input_nr];
      targets.through[i] = through ? 1 : 0;
    }
    std::vector<Tensor> out;
    if (any || node->runs_without_grads()) {
      try {
        const KernelProfileBackwardScope scope(node->name());
        const SumTargetsScope offered(&targets);
        out = node->apply(std::move(in));
      } catch (const Error& e) {
        throw Error(std::string("in the backward of ") + node->name() + ": " + e.what());
      }
      HYDRA_CHECK(out.size() == node->next_edges().size() || out.empty())
          << node->name() << " returned " << out.size() << " gradients for "
          << node->next_edges().size() << " inputs";
    }
    if (!retain_graph) node->release_saved();

    const auto& edges = node->next_edges();
    for (std::size_t i = 0; i < edges.size(); ++i) {
      const Edge& e = edges[i];
      if (!e.valid()) continue;
      Node* next = e.node.get();
      auto& buf = buffers[next];
      buf.resize(next->num_outputs());
      if (i < out.size() && targets.claimed[i] != 0) {  // the op added its part in place
        const Tensor& sum = *targets.slots[i];
        HYDRA_CHECK(targets.through[i] != 0
                        ? out[i].raw_data() == sum.raw_data() && out[i].numel() == sum.numel()
                        : out[i].unsafe_impl() == sum.unsafe_impl())
            << node->name() << ": took input " << i
            << "'s gradient sum (gradient_sum_target) but returned another tensor";
      } else if (i < out.size()) {
        // HYDRA_PROFILE=ops names the op whose gradient is added to an earlier one.
        static const std::string kSums = "(gradient sums)";
        const bool named = kernel_profile_ops() && out[i].defined() && buf[e.input_nr].defined();
        const std::string label = named ? "(gradient sums after " + node->name() + ")" : "";
        const KernelProfileBackwardScope scope(named ? label : kSums);  // keeps a reference
        accumulate(buf, e.input_nr, out[i]);
      }
      if (--pending[next] == 0) ready.push(e.node);
    }
  }
  flush_gradient_conversions();  // every .grad holds its values when the backward returns
}

}  // namespace hydra
