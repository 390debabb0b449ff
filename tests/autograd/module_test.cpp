#include "autograd/module.h"

#include <gtest/gtest.h>

#include "autograd/ops.h"

namespace hydra {
namespace {

class Linear : public Module {
 public:
  Linear(int64_t in, int64_t out) {
    weight = register_parameter("weight", zeros({out, in}));
    bias = register_parameter("bias", zeros({out}), ParamOptions{.weight_decay = false});
  }
  Tensor weight, bias;
};

class Block : public Module {
 public:
  Block() {
    in_proj = register_module("in_proj", std::make_shared<Linear>(4, 8));
    out_proj = register_module("out_proj", std::make_shared<Linear>(8, 4));
  }
  std::shared_ptr<Linear> in_proj, out_proj;
};

class Net : public Module {
 public:
  explicit Net(int n) {
    blocks = register_module("blocks", std::make_shared<ModuleList>());
    for (int i = 0; i < n; ++i) blocks->push_back(std::make_shared<Block>());
    scale = register_parameter("scale", ones({4}),
                               ParamOptions{.weight_decay = false, .lr_group = "gates"});
  }
  std::shared_ptr<ModuleList> blocks;
  Tensor scale;
};

TEST(Module, HierarchicalParameterNames) {
  Net net(2);
  std::vector<std::string> names;
  for (const auto& p : net.named_parameters()) names.push_back(p.name);
  EXPECT_EQ(names,
            (std::vector<std::string>{"scale", "blocks.0.in_proj.weight", "blocks.0.in_proj.bias",
                                      "blocks.0.out_proj.weight", "blocks.0.out_proj.bias",
                                      "blocks.1.in_proj.weight", "blocks.1.in_proj.bias",
                                      "blocks.1.out_proj.weight", "blocks.1.out_proj.bias"}));
  EXPECT_EQ(net.num_parameters(), 4 + 2 * (32 + 8 + 32 + 4));
  EXPECT_TRUE(net.find_parameter("blocks.1.out_proj.bias")
                  .is_same(net.blocks->at<Block>(1).out_proj->bias));
  EXPECT_FALSE(net.find_parameter("blocks.2.in_proj.bias").defined());
  for (const auto& p : net.named_parameters()) EXPECT_TRUE(p.tensor.requires_grad()) << p.name;
  // parameters() (built without the names): the same tensors in the same order.
  const std::vector<Tensor> plain = net.parameters();
  const std::vector<NamedParameter> named = net.named_parameters();
  ASSERT_EQ(plain.size(), named.size());
  for (std::size_t i = 0; i < plain.size(); ++i)
    EXPECT_TRUE(plain[i].is_same(named[i].tensor)) << named[i].name;
}

TEST(Module, ZeroGradClearsEveryGradient) {
  Net net(2);
  for (const Tensor& p : net.parameters()) p.set_grad(ones(p.shape()));
  net.zero_grad();
  for (const auto& p : net.named_parameters()) {
    EXPECT_FALSE(p.tensor.grad().defined()) << p.name;
    EXPECT_EQ(p.tensor.sparse_grad(), nullptr) << p.name;
  }
}

TEST(Module, ParameterOptionsTravelWithTheName) {
  Net net(1);
  for (const auto& p : net.named_parameters()) {
    const bool is_bias = p.name.ends_with("bias") || p.name == "scale";
    EXPECT_EQ(p.options.weight_decay, !is_bias) << p.name;
  }
  EXPECT_EQ(net.named_parameters()[0].options.lr_group, "gates");
}

TEST(Module, DuplicateNamesAreRejected) {
  class Bad : public Module {
   public:
    Bad() {
      register_parameter("w", zeros({1}));
      register_parameter("w", zeros({1}));
    }
  };
  EXPECT_THROW(Bad(), Error);
}

TEST(Module, ToDtypeKeepsHandlesValid) {
  Net net(1);
  Tensor handle = net.blocks->at<Block>(0).in_proj->weight;
  net.to(DType::kF64);
  EXPECT_EQ(handle.dtype(), DType::kF64);
  EXPECT_TRUE(handle.requires_grad());
}

}  // namespace
}  // namespace hydra
