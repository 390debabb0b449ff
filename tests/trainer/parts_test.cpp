#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include "autograd/grad_mode.h"
#include "autograd/module.h"
#include "autograd/ops.h"
#include "configs/tensorboard.pb.h"
#include "trainer/crc32c.h"
#include "trainer/metrics.h"
#include "trainer/optimizer.h"
#include "trainer/schedule.h"
#include "trainer/trainer.h"

namespace hydra::trainer {
namespace {

TEST(Schedule, WarmupThenCosineLinearConstant) {
  config::LrSchedule s;
  s.set_lr(1.0);
  s.set_warmup_steps(10);
  s.set_min_lr_ratio(0.1);
  EXPECT_DOUBLE_EQ(scheduled_lr(s, 0, 110), 0.1);
  EXPECT_DOUBLE_EQ(scheduled_lr(s, 9, 110), 1.0);
  EXPECT_NEAR(scheduled_lr(s, 60, 110), 0.55, 1e-12);  // halfway through the decay
  EXPECT_NEAR(scheduled_lr(s, 110, 110), 0.1, 1e-12);
  s.set_kind(config::LrSchedule::LINEAR);
  EXPECT_NEAR(scheduled_lr(s, 35, 110), 1.0 - 0.9 * 0.25, 1e-12);
  s.set_kind(config::LrSchedule::CONSTANT);
  EXPECT_DOUBLE_EQ(scheduled_lr(s, 100, 110), 1.0);
}

// Evaluation counts a task's answer at exactly the positions t whose target (the token after t) is
// an answer. The loader's tags are checked against the text itself (each task's grammar,
// data/synthetic.h): a chaining or distant answer follows "?x=", a recall answer "?xy:", a factual
// answer is what follows '=' and a copying answer what follows '|' on their lines, and a mixture
// answer ends its line; no other target is an answer. Then AnswerTally: predictions equal to the
// targets score every answer, predictions wrong at exactly the answer positions score none, and
// wrong everywhere else still all; predictions one position late or early score few.
TEST(Evaluation, CountsAnswersExactlyWhereTheTargetIsAnAnswer) {
  auto src = std::make_shared<data::SyntheticSource>(config::SyntheticConfig());
  const int64_t len = 4096, batch = 4;
  data::Loader loader(src, {.seed = 3,
                            .global_batch = batch,
                            .first = 0,
                            .count = batch,
                            .seq_len = len,
                            .prefetch = 0,
                            .split = data::Split::kEval});
  const Expected<data::Batch> got = loader.get(0);
  ASSERT_TRUE(got.ok()) << got.status().message();
  const data::Batch& b = *got;
  using data::Task;
  std::array<int64_t, data::kNumTasks> tagged{};
  int64_t checked = 0;
  for (int64_t s = 0; s < batch; ++s) {
    // The sequence's text: its tokens and the last target; target t is text[t + 1].
    std::string text;
    for (int64_t t = 0; t < len; ++t) text += static_cast<char>(b.tokens[s * len + t]);
    text += static_cast<char>(b.targets[s * len + len - 1]);
    const std::size_t first_line = text.find('\n') + 1;  // the sequence may start mid-line
    for (int64_t t = 0; t < len; ++t) {
      const int64_t i = s * len + t;
      const std::size_t j = static_cast<std::size_t>(t) + 1;
      ASSERT_EQ(b.targets[i], static_cast<unsigned char>(text[j]));
      if (b.answer[i] >= 0) ++tagged[b.answer[i]];
      if (j < first_line || text[j] == '\n') {
        if (j >= first_line) {
          EXPECT_EQ(b.answer[i], -1) << "a line end tagged at " << t;
        }
        continue;
      }
      const std::size_t start = text.rfind('\n', j - 1) + 1;
      const std::string line = text.substr(start, text.find('\n', j) - start);
      const std::size_t at = j - start;  // the target's offset in its line
      const std::string before = line.substr(0, at);
      int expected = -1;
      switch (line[0]) {
        case 'H':
        case 'Q':
          if (at >= 3 && line[at - 1] == '=' && line[at - 3] == '?')
            expected = static_cast<int>(line[0] == 'H' ? Task::kChaining : Task::kDistant);
          break;
        case 'R':
        case 'T':
          if (at >= 4 && line[at - 1] == ':' && line[at - 4] == '?')
            expected = static_cast<int>(Task::kRecall);
          break;
        case 'F':
          if (before.find('=') != std::string::npos) expected = static_cast<int>(Task::kFactual);
          break;
        case 'C':
          if (before.find('|') != std::string::npos) expected = static_cast<int>(Task::kCopying);
          break;
        case 'M':
          // A mixture answer is the line's tail: tagged here, then every target to the line's end.
          if (b.answer[i] >= 0) {
            EXPECT_EQ(b.answer[i], static_cast<int>(Task::kMixture)) << line;
            if (t + 1 < len && text[j + 1] != '\n') {
              EXPECT_EQ(b.answer[i + 1], b.answer[i]) << line;
            }
          }
          ++checked;
          continue;
        default:
          break;
      }
      EXPECT_EQ(b.answer[i], expected) << "target " << t << " of sequence " << s << " in \"" << line
                                       << "\" (offset " << at << ")";
      ++checked;
    }
  }
  EXPECT_GT(checked, batch * len * 9 / 10);
  for (int k = 0; k < data::kNumTasks; ++k) EXPECT_GT(tagged[k], 0) << data::task_name(k);

  // The tally of predictions against those positions.
  auto tally = [&](const std::vector<int64_t>& predicted) {
    AnswerTally a(data::SyntheticTasks::kVocab);
    a.count(b, predicted);
    return a;
  };
  const AnswerTally exact = tally(b.targets);
  std::vector<int64_t> wrong_answers = b.targets, wrong_elsewhere = b.targets;
  for (std::size_t i = 0; i < b.targets.size(); ++i)
    (b.answer[i] >= 0 ? wrong_answers : wrong_elsewhere)[i] = (b.targets[i] + 1) % 128;
  const AnswerTally none = tally(wrong_answers), all = tally(wrong_elsewhere);
  std::vector<int64_t> late(b.targets.size()), early(b.targets.size());
  for (std::size_t i = 0; i < b.targets.size(); ++i) {
    late[i] = i > 0 ? b.targets[i - 1] : 0;
    early[i] = i + 1 < b.targets.size() ? b.targets[i + 1] : 0;
  }
  const AnswerTally shifted_late = tally(late), shifted_early = tally(early);
  for (int k = 0; k < data::kNumTasks; ++k) {
    SCOPED_TRACE(data::task_name(k));
    EXPECT_EQ(exact.answers[k], double(tagged[k]));
    EXPECT_EQ(exact.correct[k], exact.answers[k]);
    EXPECT_EQ(none.correct[k], 0);
    EXPECT_EQ(all.correct[k], all.answers[k]);
    EXPECT_LT(shifted_late.correct[k], 0.5 * exact.answers[k]);
    EXPECT_LT(shifted_early.correct[k], 0.5 * exact.answers[k]);
    double levels = 0;
    for (int l = 0; l < data::kNumLevels; ++l)
      levels += exact.level_answers[k * data::kNumLevels + l];
    const bool leveled =
        k != static_cast<int>(Task::kFactual) && k != static_cast<int>(Task::kCopying);
    EXPECT_EQ(levels, leveled ? exact.answers[k] : 0.0);
  }
}

TEST(Crc32c, KnownVectorsAndMasking) {
  EXPECT_EQ(crc32c("123456789", 9), 0xE3069283u);
  EXPECT_EQ(crc32c("", 0), 0u);
  const uint32_t c = crc32c("abc", 3);
  EXPECT_EQ(masked_crc32c("abc", 3), ((c >> 15) | (c << 17)) + 0xa282ead8u);
  EXPECT_EQ(crc32c_table("123456789", 9), 0xE3069283u);
  // The instruction's path (8 bytes at a time, then the tail) equals the table's at every length
  // and alignment, and when continued from a previous value.
  std::vector<unsigned char> buf(1000);
  std::mt19937 rng(7);
  for (unsigned char& b : buf) b = static_cast<unsigned char>(rng());
  for (std::size_t off : {0, 1, 3, 7})
    for (std::size_t n : {0, 1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 500, 993}) {
      EXPECT_EQ(crc32c(buf.data() + off, n), crc32c_table(buf.data() + off, n)) << off << "+" << n;
      EXPECT_EQ(crc32c(buf.data() + off, n, 0x12345678u),
                crc32c_table(buf.data() + off, n, 0x12345678u));
    }
}

class TwoParams : public Module {
 public:
  TwoParams() {
    w = register_parameter("w", tensor<float>({1, -2, 3, -4}, {2, 2}));
    g = register_parameter("g", tensor<float>({0.5, 0.25}, {2}),
                           ParamOptions{.weight_decay = false});
    table = register_parameter("table", tensor<float>({1, 2, 3, 4, 5, 6}, {3, 2}),
                               ParamOptions{.weight_decay = false, .lr_group = "pkm_values"});
  }
  Tensor w, g, table;
};

TEST(AdamW, MatchesTheUpdateRuleWithGroupsSparseRowsAndFreezing) {
  TwoParams m;
  config::OptimizerConfig cfg;
  cfg.set_beta1(0.9);
  cfg.set_beta2(0.99);
  cfg.set_eps(1e-8);
  cfg.set_weight_decay(0.1);
  AdamW opt(m.named_parameters(), cfg, {{"pkm_values", 0.5}});
  // Reference state for w[0] (decayed) and g[0] (not decayed), two steps of gradient 1 and 2.
  double w0 = 1, mw = 0, vw = 0, g0 = 0.5, mg = 0, vg = 0;
  for (int step = 1; step <= 2; ++step) {
    {
      NoGradGuard ng;
      m.w.set_grad(full({2, 2}, double(step)));
      m.g.set_grad(full({2}, double(step)));
    }
    accumulate_sparse_grad(m.table, tensor<int64_t>({2}, {1}), tensor<float>({1, 1}, {1, 2}));
    opt.step(/*lr=*/0.01, /*base_lr=*/0.02,
             /*grad_scale=*/1.0);  // the schedule is at half its peak
    const double lr = 0.01, b1 = 0.9, b2 = 0.99, gr = step;
    mw = b1 * mw + (1 - b1) * gr;
    vw = b2 * vw + (1 - b2) * gr * gr;
    w0 = w0 * (1 - lr * 0.1) -
         lr * (mw / (1 - std::pow(b1, step))) / (std::sqrt(vw / (1 - std::pow(b2, step))) + 1e-8);
    mg = b1 * mg + (1 - b1) * gr;
    vg = b2 * vg + (1 - b2) * gr * gr;
    g0 = g0 -
         lr * (mg / (1 - std::pow(b1, step))) / (std::sqrt(vg / (1 - std::pow(b2, step))) + 1e-8);
    m.zero_grad();
  }
  EXPECT_NEAR(m.w.to_vector<float>()[0], w0, 1e-6);
  EXPECT_NEAR(m.g.to_vector<float>()[0], g0, 1e-6);
  // The table: only row 2 moved, at the group's rate scaled like the base (0.5 * 0.01 / 0.02).
  const auto t = m.table.to_vector<float>();
  EXPECT_EQ(t[0], 1.0f);
  EXPECT_EQ(t[3], 4.0f);
  EXPECT_NEAR(t[4], 5.0 - 2 * 0.25, 1e-4);  // two Adam steps of ~lr each on a constant gradient
  // Frozen: no update, no grad required.
  opt.set_frozen("w", true);
  EXPECT_FALSE(m.w.requires_grad());
  const auto before = m.w.to_vector<float>();
  opt.step(0.01, 0.02, 1.0);
  EXPECT_EQ(m.w.to_vector<float>(), before);
}

// A group whose rate is 0 follows the base rate (router_lr 0); a positive one is its own peak,
// scaled like the base (router_lr 0.04 at half the schedule's peak: 0.02).
TEST(AdamW, GroupRateZeroFollowsTheBaseRate) {
  for (const double group : {0.0, 0.04}) {
    TwoParams a, b;
    NoGradGuard ng;
    AdamW opt_a(a.named_parameters(), config::OptimizerConfig(), {{"pkm_values", group}});
    AdamW opt_b(b.named_parameters(), config::OptimizerConfig(), {{"pkm_values", 0.02}});
    for (TwoParams* m : {&a, &b}) {
      m->w.set_grad(full({2, 2}, 1.0));
      m->g.set_grad(full({2}, 1.0));
      m->table.set_grad(full({3, 2}, 1.0));
    }
    opt_a.step(/*lr=*/0.01, /*base_lr=*/0.02, 1.0);
    opt_b.step(0.01, 0.02, 1.0);
    const auto ta = a.table.to_vector<float>(), tb = b.table.to_vector<float>();
    if (group == 0) {
      EXPECT_EQ(ta, tb) << "rate 0: the base's 0.02 peak";
    } else {
      EXPECT_NEAR(1.0f - ta[0], 2 * (1.0f - tb[0]), 1e-6) << "0.04: twice the base's step";
    }
  }
}

TEST(AdamW, GradientNormCoversDenseAndSparseGradients) {
  TwoParams m;
  AdamW opt(m.named_parameters(), config::OptimizerConfig(), {{"pkm_values", 1.0}});
  {
    NoGradGuard ng;
    m.w.set_grad(full({2, 2}, 1.0));
  }
  accumulate_sparse_grad(m.table, tensor<int64_t>({0}, {1}), tensor<float>({3, 4}, {1, 2}));
  EXPECT_NEAR(opt.grad_norm(), std::sqrt(4.0 + 25.0), 1e-6);
}

// Clipping on the device (the trainer's path): the factor the kernels compute from the gradients'
// sum of squares equals the host's from its norm, bit for bit, clipping or not; a non-finite sum
// updates nothing (the trainer then stops).
TEST(AdamW, ClippingOnTheDeviceEqualsTheHostsFactor) {
  const auto all = [](const std::string&) { return true; };
  for (const double clip : {0.0, 0.5, 100.0, -1.0}) {  // -1: a NaN in a gradient
    TwoParams a, b;
    AdamW opt_a(a.named_parameters(), config::OptimizerConfig(), {{"pkm_values", 0.5}});
    AdamW opt_b(b.named_parameters(), config::OptimizerConfig(), {{"pkm_values", 0.5}});
    for (TwoParams* m : {&a, &b}) {
      {
        NoGradGuard ng;
        m->w.set_grad(tensor<float>({0.3f, clip < 0 ? NAN : -1.2f, 2.5f, 0.7f}, {2, 2}));
        m->g.set_grad(tensor<float>({-0.4f, 0.9f}, {2}));
      }
      accumulate_sparse_grad(m->table, tensor<int64_t>({2, 0}, {2}),
                             tensor<float>({1.5f, -0.5f, 0.25f, 2.0f}, {2, 2}));
    }
    const Tensor before = b.w.clone();
    const Tensor ss = opt_b.grad_sum_squares_on_device(all);
    if (clip >= 0) {
      EXPECT_EQ(ss.to_vector<double>()[0], opt_a.grad_sum_squares(all));
    }
    const double norm = opt_a.grad_norm();
    opt_b.step(0.01, 0.02, ss, std::max(clip, 0.0));
    if (clip < 0) {
      EXPECT_EQ(b.w.to_vector<float>(), before.to_vector<float>()) << "a NaN gradient: no update";
      EXPECT_EQ(b.table.to_vector<float>(), a.table.to_vector<float>());
      continue;
    }
    opt_a.step(0.01, 0.02, clip > 0 && norm > clip ? clip / (norm + 1e-6) : 1.0);
    EXPECT_EQ(a.w.to_vector<float>(), b.w.to_vector<float>()) << "clip " << clip;
    EXPECT_EQ(a.g.to_vector<float>(), b.g.to_vector<float>()) << "clip " << clip;
    EXPECT_EQ(a.table.to_vector<float>(), b.table.to_vector<float>()) << "clip " << clip;
  }
}

class BagTable : public Module {
 public:
  explicit BagTable(Tensor init) {
    table = register_parameter("table", std::move(init),
                               ParamOptions{.weight_decay = false, .lr_group = "pkm_values"});
  }
  Tensor table;
};

// The embedding bag's pending gradient: the optimizer updates the hit rows from the whole table's
// gradient without resolving the rows (no wait for the device), exactly as from the resolved rows;
// the gradient norm agrees (summed in another order).
TEST(AdamW, PendingBagGradientUpdatesTheHitRowsAsTheResolvedRows) {
  const auto all = [](const std::string&) { return true; };
  const Tensor idx = tensor<int64_t>({0, 3, 3, 5, 6, 0}, {3, 2});
  Generator gen(5);
  const Tensor weights = randn({3, 2}, gen), probe = randn({3, 3}, gen), init = randn({7, 3}, gen);
  std::vector<std::vector<float>> tables;
  std::vector<double> norms;
  for (const bool resolve : {false, true}) {
    BagTable m(init.clone());
    const Tensor& table = m.table;
    AdamW opt(m.named_parameters(), config::OptimizerConfig(), {{"pkm_values", 0.5}});
    for (int step = 0; step < 2; ++step) {
      sum(mul(embedding_bag(table, idx, weights, true), probe)).backward();
      ASSERT_TRUE(table.sparse_grad_as_is() != nullptr);
      ASSERT_TRUE(table.sparse_grad_as_is()->pending != nullptr);
      if (resolve) {
        ASSERT_EQ(table.sparse_grad()->rows.numel(), 4);
      }
      norms.push_back(opt.grad_sum_squares(all));
      opt.step(0.01, 0.02, opt.grad_sum_squares_on_device(all), 1.0);
      EXPECT_EQ(table.sparse_grad_as_is()->pending != nullptr, !resolve) << "not resolved";
      m.zero_grad();
    }
    tables.push_back(table.to_vector<float>());
  }
  EXPECT_EQ(tables[0], tables[1]);
  EXPECT_NEAR(norms[0], norms[2], 1e-6 * norms[2]);
  EXPECT_NEAR(norms[1], norms[3], 1e-6 * norms[3]);
  EXPECT_EQ(tables[0][1 * 3], init.to_vector<float>()[1 * 3]) << "row 1 not hit: unchanged";
}

TEST(TensorBoard, RecordsAreFramedWithMaskedCrcAndParse) {
  const std::string dir =
      std::filesystem::temp_directory_path() / ("hydra_tb_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  std::string path;
  {
    auto w = TensorBoardWriter::open(dir);
    ASSERT_TRUE(w.ok());
    w->scalars(7, {{"loss", 2.5}, {"lr", 1e-3}});
    w->flush();
    path = w->path();
  }
  std::ifstream in(path, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<tensorboard::Event> events;
  std::size_t pos = 0;
  while (pos + 12 <= bytes.size()) {
    uint64_t len;
    uint32_t len_crc, data_crc;
    std::memcpy(&len, bytes.data() + pos, 8);
    std::memcpy(&len_crc, bytes.data() + pos + 8, 4);
    ASSERT_EQ(len_crc, masked_crc32c(bytes.data() + pos, 8));
    const std::string data = bytes.substr(pos + 12, len);
    std::memcpy(&data_crc, bytes.data() + pos + 12 + len, 4);
    ASSERT_EQ(data_crc, masked_crc32c(data.data(), data.size()));
    tensorboard::Event e;
    ASSERT_TRUE(e.ParseFromString(data));
    events.push_back(e);
    pos += 12 + len + 4;
  }
  ASSERT_EQ(events.size(), 2u);
  EXPECT_EQ(events[0].file_version(), "brain.Event:2");
  EXPECT_EQ(events[1].step(), 7);
  ASSERT_EQ(events[1].summary().value_size(), 2);
  EXPECT_EQ(events[1].summary().value(0).tag(), "loss");
  EXPECT_FLOAT_EQ(events[1].summary().value(0).simple_value(), 2.5f);
}

}  // namespace
}  // namespace hydra::trainer
