#include "autograd/checkpoint.h"

#include "autograd/engine.h"
#include "autograd/grad_mode.h"
#include "autograd/node.h"
#include "autograd/ops.h"

namespace hydra {
namespace {

thread_local int recompute_depth = 0;

class CheckpointNode final : public Node {
 public:
  CheckpointNode(CheckpointFn fn, const std::vector<Tensor>& inputs, GeneratorState rng)
      : Node("checkpoint"), fn_(std::move(fn)), rng_(rng) {
    for (const Tensor& t : inputs) {
      saved_.emplace_back(t);
      requires_.push_back(t.defined() && t.requires_grad());
    }
  }

  std::vector<Tensor> apply(std::vector<Tensor>&& grads) override {
    HYDRA_CHECK(fn_ != nullptr)
        << "backward through a checkpoint a second time (pass retain_graph = true)";
    std::vector<Tensor> inputs;
    for (std::size_t i = 0; i < saved_.size(); ++i) {
      Tensor t = saved_[i].get();
      if (t.defined()) {
        t = t.detach();
        if (requires_[i]) t.set_requires_grad(true);
      }
      inputs.push_back(t);
    }
    std::vector<Tensor> outputs, inner_collectives;
    {
      const GeneratorState outer = default_generator().state();
      default_generator().set_state(rng_);
      EnableGradGuard grad_on;
      ++recompute_depth;
      std::vector<Tensor> outer_collectives = take_collective_outputs();
      try {
        outputs = fn_(inputs);
      } catch (...) {
        --recompute_depth;
        default_generator().set_state(outer);
        put_collective_outputs(std::move(outer_collectives));
        throw;
      }
      --recompute_depth;
      default_generator().set_state(outer);
      inner_collectives = take_collective_outputs();
      put_collective_outputs(std::move(outer_collectives));
    }
    HYDRA_CHECK(outputs.size() == grads.size())
        << "checkpoint: the recomputation returned " << outputs.size() << " outputs, the forward "
        << grads.size();
    std::vector<Tensor> roots, root_grads;
    for (std::size_t i = 0; i < outputs.size(); ++i) {
      if (grads[i].defined() && outputs[i].defined() && outputs[i].requires_grad()) {
        roots.push_back(outputs[i]);
        root_grads.push_back(grads[i]);
      }
    }
    // Collectives recomputed inside the segment run in this nested backward on every rank.
    if (!roots.empty() && !inner_collectives.empty()) {
      EnableGradGuard grad_on;
      roots[0] = anchor_collectives(roots[0], inner_collectives);
    }
    if (!roots.empty()) run_backward(roots, root_grads);
    std::vector<Tensor> input_grads;
    for (std::size_t i = 0; i < inputs.size(); ++i)
      input_grads.push_back(requires_[i] ? inputs[i].grad() : Tensor());
    return input_grads;
  }

  void release_saved() override {
    fn_ = nullptr;
    saved_.clear();
  }

 private:
  CheckpointFn fn_;
  GeneratorState rng_;
  std::vector<SavedTensor> saved_;
  std::vector<bool> requires_;
};

}  // namespace

bool is_recomputing() { return recompute_depth > 0; }

std::vector<Tensor> checkpoint(const CheckpointFn& fn, const std::vector<Tensor>& inputs) {
  if (!GradMode::enabled()) return fn(inputs);
  const GeneratorState rng = default_generator().state();
  std::vector<Tensor> outputs;
  {
    NoGradGuard no_grad;
    std::vector<Tensor> detached;
    detached.reserve(inputs.size());
    for (const Tensor& t : inputs) detached.push_back(t.defined() ? t.detach() : t);
    outputs = fn(detached);
  }
  // The node is created even when no input requires grad: fn's parameters may.
  auto node = std::make_shared<CheckpointNode>(fn, inputs, rng);
  node->set_num_outputs(static_cast<uint32_t>(outputs.size()));
  std::vector<Edge> edges;
  edges.reserve(inputs.size());
  for (const Tensor& t : inputs) edges.push_back(gradient_edge(t));
  node->set_next_edges(std::move(edges));
  for (std::size_t i = 0; i < outputs.size(); ++i) {
    if (!outputs[i].defined() || !is_floating(outputs[i].dtype())) continue;
    outputs[i] = outputs[i].detach();  // a fresh handle, even if fn returned one of its inputs
    auto& meta = outputs[i].unsafe_impl()->autograd;
    meta.requires_grad = true;
    meta.grad_fn = node;
    meta.output_nr = static_cast<uint32_t>(i);
  }
  return outputs;
}

}  // namespace hydra
