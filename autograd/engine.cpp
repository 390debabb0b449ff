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

void accumulate(std::vector<Tensor>& buffer, uint32_t slot, const Tensor& g) {
  if (!g.defined()) return;
  Tensor& cur = buffer[slot];
  cur = cur.defined() ? add(cur, g) : g;
}

}  // namespace

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

    std::vector<Tensor> out;
    if (any || node->runs_without_grads()) {
      try {
        const KernelProfileBackwardScope scope(node->name());
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
      if (i < out.size()) {
        static const std::string kSums = "(gradient sums)";
        const KernelProfileBackwardScope scope(kSums);
        accumulate(buf, e.input_nr, out[i]);
      }
      if (--pending[next] == 0) ready.push(e.node);
    }
  }
  flush_gradient_conversions();  // every .grad holds its values when the backward returns
}

}  // namespace hydra
