#include <gtest/gtest.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <thread>

#include "data/loader.h"
#include "data/tokenizer.h"

namespace hydra::data {
namespace {

namespace fs = std::filesystem;

std::string temp_dir(const std::string& name) {
  const fs::path p =
      fs::temp_directory_path() / ("hydra_test_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p.string();
}

const std::vector<std::string> kCorpus = {"the cat sat on the mat. the cat ate the rat.",
                                          "a hat, a bat, and the cat that sat; the end.",
                                          "Numbers 123 and 456 are not the cat."};

TEST(ByteTokenizer, RoundTripsAnyBytes) {
  ByteTokenizer t;
  const std::string s = std::string("h\xC3\xA9llo\n\x01\xff", 9);
  EXPECT_EQ(t.decode(t.encode(s)), s);
  EXPECT_EQ(t.encode("AB"), (std::vector<int32_t>{65, 66}));
}

TEST(BpeTokenizer, TrainsDeterministicallyAndRoundTrips) {
  auto a = BpeTokenizer::train(kCorpus, 280);
  auto b = BpeTokenizer::train(kCorpus, 280);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->merges(), b->merges());
  EXPECT_EQ(a->id(), b->id());
  EXPECT_GT(a->vocab_size(), 256);
  for (const std::string& s : kCorpus) {
    const auto tokens = a->encode(s);
    EXPECT_LT(tokens.size(), s.size()) << "merges should shorten the corpus text";
    EXPECT_EQ(a->decode(tokens), s);
  }
  EXPECT_EQ(a->decode(a->encode("zebra xylophone")),
            "zebra xylophone");  // unseen text still round-trips
}

TEST(BpeTokenizer, SavesAndLoadsAndRejectsDamagedFiles) {
  const std::string dir = temp_dir("bpe");
  auto t = BpeTokenizer::train(kCorpus, 270);
  ASSERT_TRUE(t.ok());
  const std::string path = dir + "/tok.bpe";
  ASSERT_TRUE(t->save(path).ok());
  auto back = BpeTokenizer::load(path);
  ASSERT_TRUE(back.ok()) << back.status().message();
  EXPECT_EQ(back->id(), t->id());
  // Truncated: drop the last lines.
  std::ifstream in(path);
  std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::ofstream(dir + "/trunc.bpe") << all.substr(0, all.size() / 2);
  auto trunc = BpeTokenizer::load(dir + "/trunc.bpe");
  ASSERT_FALSE(trunc.ok());
  EXPECT_NE(trunc.status().message().find("trunc.bpe: truncated"), std::string::npos)
      << trunc.status().message();
  std::ofstream(dir + "/junk.bpe") << "not a tokenizer\n";
  EXPECT_NE(
      BpeTokenizer::load(dir + "/junk.bpe").status().message().find("not a Hydra BPE tokenizer"),
      std::string::npos);
  EXPECT_EQ(BpeTokenizer::load(dir + "/missing.bpe").status().code(), StatusCode::kNotFound);
  std::ofstream(dir + "/bad.bpe") << "hydra-bpe 1\n1\n300 5\n";
  EXPECT_NE(BpeTokenizer::load(dir + "/bad.bpe").status().message().find("refers to token 300"),
            std::string::npos);
}

TEST(TokenShard, WritesAndReadsWindows) {
  const std::string dir = temp_dir("shard");
  std::vector<int32_t> tokens(1000);
  for (int i = 0; i < 1000; ++i) tokens[i] = (i * 7) % 300;
  ASSERT_TRUE(write_token_shard(dir + "/a.h5", tokens, {0, 400}, "bpe-300-x", 300).ok());
  auto s = TokenShard::open(dir + "/a.h5");
  ASSERT_TRUE(s.ok()) << s.status().message();
  EXPECT_EQ(s->num_tokens(), 1000);
  EXPECT_EQ(s->num_docs(), 2);
  EXPECT_EQ(s->tokenizer(), "bpe-300-x");
  std::vector<int32_t> w(10);
  ASSERT_TRUE(s->read(500, 10, w.data()).ok());
  EXPECT_EQ(w, std::vector<int32_t>(tokens.begin() + 500, tokens.begin() + 510));
  EXPECT_FALSE(s->read(995, 10, w.data()).ok());
  EXPECT_FALSE(fs::exists(dir + "/a.h5.tmp"));
}

TEST(TokenShard, DamagedMissingAndOutOfVocabularyShardsAreClearErrors) {
  const std::string dir = temp_dir("badshard");
  std::vector<int32_t> tokens(5000, 3);
  tokens[4321] = 299;
  ASSERT_TRUE(
      write_token_shard(dir + "/ok.h5", tokens, {0}, "bytes", 256).ok());  // 299 >= vocab 256
  auto s = TokenShard::open(dir + "/ok.h5");
  ASSERT_TRUE(s.ok());
  std::vector<int32_t> w(100);
  const Status oov = s->read(4300, 100, w.data());
  EXPECT_NE(
      oov.message().find("token 299 at position 4321 is outside the shard's vocabulary of 256"),
      std::string::npos)
      << oov.message();
  // Truncated file.
  {
    std::ifstream in(dir + "/ok.h5", std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::ofstream(dir + "/cut.h5", std::ios::binary) << bytes.substr(0, bytes.size() / 2);
  }
  auto cut = TokenShard::open(dir + "/cut.h5");
  ASSERT_FALSE(cut.ok());
  EXPECT_NE(cut.status().message().find("cut.h5"), std::string::npos) << cut.status().message();
  std::ofstream(dir + "/text.h5") << "hello";
  EXPECT_NE(TokenShard::open(dir + "/text.h5").status().message().find("not an HDF5 file"),
            std::string::npos);
  EXPECT_EQ(TokenShard::open(dir + "/none.h5").status().code(), StatusCode::kNotFound);
  EXPECT_FALSE(expand_shard_paths({dir + "/nope"}).ok());
  auto listed = expand_shard_paths({dir});
  ASSERT_TRUE(listed.ok());
  EXPECT_EQ(listed->size(), 3u);  // cut.h5, ok.h5, text.h5 (by name)
}

TEST(Loader, SequencesDependOnlyOnSeedStepAndIndex) {
  config::SyntheticConfig cfg;
  auto src = std::make_shared<SyntheticSource>(cfg);
  LoaderOptions whole{
      .seed = 5, .global_batch = 4, .first = 0, .count = 4, .seq_len = 64, .prefetch = 2};
  LoaderOptions part = whole;
  part.first = 2;
  part.count = 2;
  part.prefetch = 0;
  Loader a(src, whole), b(src, part);
  for (int64_t step : {0, 1, 2, 7, 3}) {  // prefetching, then a jump back
    auto x = a.get(step);
    auto y = b.get(step);
    ASSERT_TRUE(x.ok() && y.ok());
    EXPECT_EQ(std::vector<int64_t>(x->tokens.begin() + 2 * 64, x->tokens.end()), y->tokens)
        << "step " << step;
    EXPECT_EQ(std::vector<int64_t>(x->tokens.begin() + 1, x->tokens.begin() + 64),
              std::vector<int64_t>(x->targets.begin(), x->targets.begin() + 63));
  }
  Loader c(src, whole);
  EXPECT_EQ(a.get(9)->tokens, c.get(9)->tokens);
  EXPECT_NE(a.get(10)->tokens, c.get(11)->tokens);
}

// The loader reads shards on its prefetch thread while the main thread uses HDF5 too (evaluation
// reads, checkpoint writes). The HDF5 we link is not thread-safe; without the lock in
// data/hdf5_file this crashes or corrupts reads.
TEST(Loader, ReadsShardsWhileAnotherThreadWritesHdf5) {
  const std::string dir = temp_dir("h5threads");
  std::vector<int32_t> tokens(20000);
  for (int i = 0; i < 20000; ++i) tokens[i] = (i * 13 + i / 5) % 256;
  ASSERT_TRUE(write_token_shard(dir + "/a.h5", tokens, {0, 7000}, "bytes", 256).ok());
  auto src = ShardSource::open({dir + "/a.h5"}, 0.1, 33);
  ASSERT_TRUE(src.ok()) << src.status().message();
  LoaderOptions o{
      .seed = 3, .global_batch = 8, .first = 0, .count = 8, .seq_len = 32, .prefetch = 4};
  LoaderOptions serial = o;
  serial.prefetch = 0;
  Loader prefetching(*src, o), reference(*src, serial);
  std::atomic<bool> stop{false};
  std::thread writer([&] {
    std::vector<int32_t> t(3000, 7);
    for (int k = 0; !stop; ++k)
      EXPECT_TRUE(
          write_token_shard(dir + "/w" + std::to_string(k % 3) + ".h5", t, {0}, "bytes", 256).ok());
  });
  for (int64_t step = 0; step < 300; ++step) {
    auto got = prefetching.get(step);
    auto want = reference.get(step);  // on this thread, concurrent with the prefetch and the writer
    ASSERT_TRUE(got.ok() && want.ok());
    ASSERT_EQ(got->tokens, want->tokens) << "step " << step;
  }
  stop = true;
  writer.join();
}

TEST(SyntheticTasks, AnswersAreWhatTheTaskAsks) {
  config::SyntheticConfig cfg;
  cfg.set_copy_len(6);
  SyntheticTasks tasks(cfg);
  Rng rng({1, 2, 3});
  const int64_t n = 4000;
  std::vector<int32_t> tok(n);
  std::vector<int8_t> ans(n), dom(n);
  tasks.fill(rng, n, tok.data(), ans.data(), dom.data());
  std::string text;
  for (int32_t t : tok) {
    ASSERT_LT(t, SyntheticTasks::kVocab);
    text.push_back(static_cast<char>(t));
  }
  std::array<int, kNumTasks> seen{};
  for (int8_t a : ans)
    if (a >= 0) ++seen[a];
  for (int k = 0; k < kNumTasks; ++k) EXPECT_GT(seen[k], 0) << task_name(k);
  // Copying: the answer is the string before '|'.
  for (std::size_t pos = text.find("C "); pos != std::string::npos && pos + 16 < text.size();
       pos = text.find("C ", pos + 1)) {
    if (pos > 0 && text[pos - 1] != '\n') continue;
    const std::string s = text.substr(pos + 2, 6);
    EXPECT_EQ(text.substr(pos + 9, 6), s);
    for (int k = 0; k < 6; ++k) EXPECT_EQ(ans[pos + 9 + k], static_cast<int8_t>(Task::kCopying));
  }
  // Recall: the value after the query is the one stored for that key.
  for (std::size_t pos = text.find('?'); pos != std::string::npos && pos + 4 < text.size();
       pos = text.find('?', pos + 1)) {
    if (text[pos + 3] != ':') continue;  // a chaining query
    const std::string key = text.substr(pos + 1, 2);
    const std::size_t start = text.rfind("R ", pos);
    const std::size_t stored = text.find(key + ":", start);
    ASSERT_LT(stored, pos);
    EXPECT_EQ(text[stored + 3], text[pos + 4]);
  }
}

}  // namespace
}  // namespace hydra::data
