#include <gtest/gtest.h>

#include "autograd/ops.h"
#include "tests/test_util.h"

namespace hydra {
namespace {

using testing::randn32;

TEST(Tensor, EmptyHasContiguousStrides) {
  Tensor t = empty({2, 3, 4});
  EXPECT_EQ(t.shape(), (Shape{2, 3, 4}));
  EXPECT_EQ(t.strides(), (Shape{12, 4, 1}));
  EXPECT_EQ(t.numel(), 24);
  EXPECT_TRUE(t.is_contiguous());
  EXPECT_EQ(t.dtype(), DType::kF32);
  EXPECT_TRUE(t.device().is_cpu());
}

TEST(Tensor, FromVectorRoundTrips) {
  Tensor t = tensor<double>({1.5, -2, 3, 4, 5, 6}, {2, 3});
  EXPECT_EQ(t.to_vector<double>(), (std::vector<double>{1.5, -2, 3, 4, 5, 6}));
  EXPECT_EQ(t.to_vector<int64_t>(), (std::vector<int64_t>{1, -2, 3, 4, 5, 6}));
  EXPECT_DOUBLE_EQ(t.select(0, 1).select(0, 2).item<double>(), 6.0);
}

TEST(Tensor, ViewsShareStorageWithoutCopies) {
  Tensor t = randn32({4, 6}, 1);
  Tensor tr = t.transpose(0, 1);
  Tensor sl = t.slice(1, 1, 5, 2);
  Tensor r = t.reshape({2, 12});
  Tensor e = t.slice(0, 0, 1).expand({3, 6});
  for (const Tensor& v : {tr, sl, r, e}) EXPECT_EQ(v.storage().get(), t.storage().get());
  EXPECT_EQ(tr.shape(), (Shape{6, 4}));
  EXPECT_FALSE(tr.is_contiguous());
  EXPECT_EQ(sl.shape(), (Shape{4, 2}));
  EXPECT_EQ(sl.strides(), (Shape{6, 2}));
  EXPECT_EQ(e.strides(), (Shape{0, 1}));
  const std::vector<float> v = t.to_vector<float>();
  EXPECT_FLOAT_EQ(tr.select(0, 5).select(0, 3).item<float>(), v[3 * 6 + 5]);
  EXPECT_FLOAT_EQ(sl.select(0, 2).select(0, 1).item<float>(), v[2 * 6 + 3]);
}

TEST(Tensor, ContiguousCopiesStridedViews) {
  Tensor t = randn32({3, 5, 7}, 2);
  Tensor p = t.permute({2, 0, 1});
  Tensor c = p.contiguous();
  EXPECT_TRUE(c.is_contiguous());
  EXPECT_NE(c.storage().get(), t.storage().get());
  const std::vector<float> src = t.to_vector<float>(), dst = c.to_vector<float>();
  for (int64_t k = 0; k < 7; ++k)
    for (int64_t i = 0; i < 3; ++i)
      for (int64_t j = 0; j < 5; ++j) EXPECT_EQ(dst[(k * 3 + i) * 5 + j], src[(i * 5 + j) * 7 + k]);
}

TEST(Tensor, ReshapeInfersOneDimension) {
  Tensor t = zeros({6, 4});
  EXPECT_EQ(t.reshape({-1, 8}).shape(), (Shape{3, 8}));
  EXPECT_EQ(t.flatten().shape(), (Shape{24}));
  EXPECT_THROW(t.reshape({5, -1}), Error);
  EXPECT_THROW(t.reshape({-1, -1}), Error);
}

TEST(Tensor, Bf16ConversionRoundsToNearestEven) {
  // 1 + 2^-8 lies exactly between two bf16 values (1 and 1 + 2^-7): ties go to the even one, 1.
  Tensor t = tensor<float>({1.0f + 1.0f / 256, 1.0f + 3.0f / 256, -2.5f, 3.0e38f}, {4});
  Tensor b = t.to(DType::kBF16);
  EXPECT_EQ(b.dtype(), DType::kBF16);
  const std::vector<float> back = b.to(DType::kF32).to_vector<float>();
  EXPECT_EQ(back[0], 1.0f);
  EXPECT_EQ(back[1], 1.0f + 4.0f / 256);
  EXPECT_EQ(back[2], -2.5f);
  EXPECT_NEAR(back[3], 3.0e38f, 3.0e38f / 128);
}

TEST(Tensor, DtypeConversionBetweenAllTypes) {
  Tensor t = tensor<double>({-3, 0, 7, 12}, {4});
  for (DType a : {DType::kF32, DType::kF64, DType::kBF16, DType::kI32, DType::kI64})
    for (DType b : {DType::kF32, DType::kF64, DType::kBF16, DType::kI32, DType::kI64})
      EXPECT_EQ(t.to(a).to(b).to_vector<double>(), (std::vector<double>{-3, 0, 7, 12}))
          << dtype_name(a) << " -> " << dtype_name(b);
}

TEST(Tensor, InPlaceOpsBumpVersion) {
  Tensor t = zeros({3});
  const uint32_t v0 = t.version();
  t.fill_(2.0);
  t.add_(ones({3}), 0.5);
  t.mul_(2.0);
  EXPECT_EQ(t.to_vector<float>(), (std::vector<float>{5, 5, 5}));
  EXPECT_EQ(t.version(), v0 + 3);
}

TEST(Tensor, CopyIntoStridedView) {
  Tensor t = zeros({3, 4});
  t.slice(1, 1, 3).copy_(tensor<float>({1, 2, 3, 4, 5, 6}, {3, 2}));
  EXPECT_EQ(t.to_vector<float>(), (std::vector<float>{0, 1, 2, 0, 0, 3, 4, 0, 0, 5, 6, 0}));
}

TEST(Tensor, ShapeErrorsNameTheOp) {
  Tensor a = zeros({2, 3}), b = zeros({4, 5});
  try {
    (void)add(a, b);
    FAIL() << "no error";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("add"), std::string::npos) << msg;
    EXPECT_NE(msg.find("[2, 3]"), std::string::npos) << msg;
    EXPECT_NE(msg.find("[4, 5]"), std::string::npos) << msg;
  }
  try {
    (void)matmul(zeros({2, 3}), zeros({4, 5}));
    FAIL() << "no error";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("matmul"), std::string::npos) << msg;
    EXPECT_NE(msg.find("[2, 3]"), std::string::npos) << msg;
    EXPECT_NE(msg.find("[4, 5]"), std::string::npos) << msg;
  }
}

// copy_many_ batches contiguous pairs into one launch and copies the rest one by one: the result
// is copy_ for every pair, converting dtypes, whatever the mix (more pairs than one launch takes).
TEST(Tensor, CopyManyEqualsCopyForEveryPair) {
  std::vector<Tensor> dst, src, want;
  for (int i = 0; i < 300; ++i) {
    const Tensor s = testing::randn64({i % 7 + 1, 3}, 100 + i, 1.0, false);
    const bool strided = i % 5 == 0, to_f32 = i % 3 == 0;
    Tensor d = zeros({i % 7 + 1, 3}, to_f32 ? DType::kF32 : DType::kF64);
    dst.push_back(d);
    src.push_back(strided ? s.transpose(0, 1).contiguous().transpose(0, 1) : s);
    want.push_back(s.to(d.dtype()));
  }
  const int64_t version = dst[1].version();
  copy_many_(dst, src);
  for (int i = 0; i < 300; ++i) EXPECT_TRUE(testing::bitwise_equal(dst[i], want[i])) << i;
  EXPECT_GT(dst[1].version(), version) << "an in-place write bumps the version";
  EXPECT_THROW(copy_many_(dst, {src[0]}), Error);
}

TEST(Tensor, MixedDtypesAreRejected) {
  EXPECT_THROW((void)add(zeros({2}, DType::kF32), zeros({2}, DType::kF64)), Error);
}

TEST(Status, ExpectedCarriesValueOrError) {
  Expected<int> good = 3;
  Expected<int> bad = invalid_argument("configs/toy.pbtxt: model.d_model = -1 must be > 0");
  EXPECT_TRUE(good.ok());
  EXPECT_EQ(*good, 3);
  EXPECT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("model.d_model"), std::string::npos);
  EXPECT_THROW((void)bad.value(), Error);
  EXPECT_EQ(bad.status().with_context("loading").message().rfind("loading: ", 0), 0u);
}

}  // namespace
}  // namespace hydra
