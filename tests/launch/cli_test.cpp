// The executables as a user runs them: exit codes, one-line errors that name the file or field, and
// nothing damaged by a refused command.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

namespace {

namespace fs = std::filesystem;

struct Result {
  int code = -1;
  std::string output;  // stdout + stderr
};

Result run(const std::string& cmd) {
  Result r;
  FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  if (!p) return r;
  char buf[4096];
  while (std::size_t n = std::fread(buf, 1, sizeof buf, p)) r.output.append(buf, n);
  const int status = pclose(p);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

std::string temp_dir(const std::string& name) {
  const fs::path p = fs::temp_directory_path() / ("hydra_cli_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p.string();
}

const std::string kTrain = HYDRA_BIN_DIR "/hydra-train";
const std::string kData = HYDRA_BIN_DIR "/hydra-data";
const std::string kParams = HYDRA_BIN_DIR "/hydra-params";
const std::string kTiny = HYDRA_SOURCE_DIR "/configs/tiny.pbtxt";
// A quick run of tiny: 2 steps, short sequences, no curriculum.
const std::string kQuick = " --set 'curriculum={}' --set train.steps=2 --set train.seq_len=64 --set train.batch_size=2 "
                           "--set train.eval_batches=1 --quiet ";

TEST(Cli, HelpExplainsEveryFlag) {
  const Result r = run(kTrain + " --help");
  EXPECT_EQ(r.code, 0);
  for (const char* flag :
       {"--config", "--set", "--out", "--resume", "--steps", "--eval-every", "--save-every", "--stats-every", "--seed"})
    EXPECT_NE(r.output.find(flag), std::string::npos) << flag;
}

TEST(Cli, ProfileTablesTheKernelsAfterTheReport) {
  const std::string dir = temp_dir("profile");
  std::string quick = kQuick;
  quick.replace(quick.find("--quiet"), 7, "--no-print-config");
  const Result r = run("HYDRA_PROFILE=1 " + kTrain + " --config " + kTiny + quick + " --out " + dir + "/run");
  EXPECT_EQ(r.code, 0) << r.output;
  const std::size_t table = r.output.find("kernel profile (HYDRA_PROFILE)");
  ASSERT_NE(table, std::string::npos) << r.output;
  EXPECT_GT(table, r.output.find("Hydra training report")) << "the table comes after the report";
  for (const char* kernel : {"gemm", "ssm_scan_fwd", "ssm_scan_bwd", "multi_adamw_step"})
    EXPECT_NE(r.output.find(kernel, table), std::string::npos) << kernel;
  EXPECT_EQ(run(kTrain + " --config " + kTiny + quick + " --out " + dir + "/plain").output.find("kernel profile"),
            std::string::npos)
      << "off without HYDRA_PROFILE";
}

TEST(Cli, MalformedConfigNamesFileLineAndExitsNonZero) {
  const std::string dir = temp_dir("malformed");
  std::ofstream(dir + "/bad.pbtxt") << "model {\n  d_model: 64\n  num_blocks: four\n}\n";
  const Result r = run(kTrain + " --config " + dir + "/bad.pbtxt --out " + dir + "/run");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find(dir + "/bad.pbtxt:3:"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(dir + "/run"));
}

TEST(Cli, OutOfRangeFieldAndUnknownSetPath) {
  const std::string dir = temp_dir("range");
  Result r = run(kTrain + " --config " + kTiny + " --out " + dir + "/run --set model.moe.max_active=9");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("model.moe.max_active = 9 must be <= num_experts (4)"), std::string::npos) << r.output;
  r = run(kTrain + " --config " + kTiny + " --out " + dir + "/run --set train.lr.rate=1");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("unknown field 'train.lr.rate'"), std::string::npos) << r.output;
  r = run(kParams + " " + kTiny + " --set model.d_model=-3");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("model.d_model = -3 must be >= 1"), std::string::npos) << r.output;
}

TEST(Cli, OccupiedOutputAndResumeOfNothing) {
  const std::string dir = temp_dir("occupied");
  Result r = run(kTrain + " --config " + kTiny + " --out " + dir + "/run" + kQuick);
  ASSERT_EQ(r.code, 0) << r.output;
  const auto stamp = fs::last_write_time(dir + "/run/metrics.jsonl");
  r = run(kTrain + " --config " + kTiny + " --out " + dir + "/run" + kQuick);
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("holds another run"), std::string::npos) << r.output;
  EXPECT_EQ(fs::last_write_time(dir + "/run/metrics.jsonl"), stamp);
  r = run(kTrain + " --config " + kTiny + " --out " + dir + "/fresh --resume" + kQuick);
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("no complete checkpoint to resume from"), std::string::npos) << r.output;
  // Continuing the first run works and appends.
  r = run(kTrain + " --config " + kTiny + " --out " + dir + "/run --resume auto --steps 4" + kQuick);
  EXPECT_EQ(r.code, 0) << r.output;
}

TEST(Cli, DataToolMakesShardsTheTrainerReads) {
  const std::string dir = temp_dir("data");
  fs::create_directories(dir + "/corpus");
  for (int i = 0; i < 3; ++i) {
    std::ofstream f(dir + "/corpus/doc" + std::to_string(i) + ".txt");
    for (int k = 0; k < 400; ++k) f << "the quick brown fox " << k << " jumps over the lazy dog. ";
  }
  Result r = run(kData + " train-bpe --vocab 300 --out " + dir + "/tok.bpe " + dir + "/corpus");
  ASSERT_EQ(r.code, 0) << r.output;
  r = run(kData + " tokenize --tokenizer " + dir + "/tok.bpe --out " + dir + "/shards " + dir + "/corpus");
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_TRUE(fs::exists(dir + "/shards/shard-00000.h5"));
  r = run(kData + " inspect " + dir + "/shards/shard-00000.h5");
  EXPECT_NE(r.output.find("3 documents"), std::string::npos) << r.output;
  r = run(kTrain + " --config " + kTiny + " --out " + dir + "/run" + kQuick + " --set model.vocab_size=300 --set data.shards=" +
          dir + "/shards --set data.tokenizer=" + dir + "/tok.bpe");
  EXPECT_EQ(r.code, 0) << r.output;
  // A missing tokenizer file, a damaged one.
  r = run(kData + " tokenize --tokenizer " + dir + "/none.bpe --out " + dir + "/x " + dir + "/corpus");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("none.bpe: cannot open the tokenizer file"), std::string::npos) << r.output;
  std::ofstream(dir + "/bad.bpe") << "hydra-bpe 1\n5\n1 2\n";
  r = run(kTrain + " --config " + kTiny + " --out " + dir + "/run2" + kQuick + " --set model.vocab_size=300 --set data.shards=" +
          dir + "/shards --set data.tokenizer=" + dir + "/bad.bpe");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("bad.bpe: truncated"), std::string::npos) << r.output;
}

// Under mpirun: a grid that does not fit the world, or experts that do not split over ep, stops every
// rank at start-up with one message (from rank 0) that says what to change; a good grid trains.
const std::string kMpirun = "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 HYDRA_NUM_THREADS=1 timeout 300 " HYDRA_MPIEXEC
                            " --oversubscribe -np 2 ";

int count(const std::string& text, const std::string& what) {
  int n = 0;
  for (std::size_t p = text.find(what); p != std::string::npos; p = text.find(what, p + 1)) ++n;
  return n;
}

TEST(Cli, MpirunWithABadGridStopsEveryRankWithOneClearMessage) {
  const std::string dir = temp_dir("badgrid");
  Result r = run(kMpirun + kTrain + " --config " + kTiny + " --out " + dir + "/run" + kQuick + " --set parallel.dp=3");
  EXPECT_NE(r.code, 0) << r.output;
  EXPECT_NE(r.code, 124) << "hung: " << r.output;
  EXPECT_EQ(count(r.output, "mpirun -np 3"), 1) << r.output;
  r = run(kMpirun + kTrain + " --config " + kTiny + " --out " + dir + "/run" + kQuick +
          " --set parallel.ep=2 --set model.moe.num_experts=3");
  EXPECT_NE(r.code, 0) << r.output;
  EXPECT_NE(r.code, 124) << "hung: " << r.output;
  EXPECT_EQ(count(r.output, "does not divide model.moe.num_experts = 3"), 1) << r.output;
  r = run(kMpirun + kTrain + " --config " + kTiny + " --out " + dir + "/run" + kQuick +
          " --set parallel.sp=2 --set train.seq_len=64 --set model.ssm.conv_width=40");
  EXPECT_NE(r.code, 0) << r.output;
  EXPECT_NE(r.code, 124) << "hung: " << r.output;
  EXPECT_EQ(count(r.output, "shorter than the 39-token halo"), 1) << r.output;
  EXPECT_FALSE(fs::exists(dir + "/run/metrics.jsonl"));
}

TEST(Cli, MpirunTrainsOnTwoDataRanks) {
  const std::string dir = temp_dir("dp2");
  const Result r = run(kMpirun + kTrain + " --config " + kTiny + " --out " + dir + "/run" + kQuick + " --set parallel.dp=2");
  ASSERT_EQ(r.code, 0) << r.output;
  std::ifstream m(dir + "/run/metrics.jsonl");
  std::string line;
  int steps = 0;
  while (std::getline(m, line)) steps += line.find("\"step\"") != std::string::npos && line.find("\"loss\"") != std::string::npos;
  EXPECT_EQ(steps, 2) << "one metrics line per step, written by rank 0 only";
}

// ZeRO-1 from the command line: each rank writes its ranges of the optimizer state; the run resumes.
TEST(Cli, MpirunTrainsWithZero1AndResumes) {
  const std::string dir = temp_dir("zero1");
  const std::string args = kTrain + " --config " + kTiny + " --out " + dir + "/run" + kQuick +
                           " --set parallel.dp=2 --set parallel.zero1=true";
  Result r = run(kMpirun + args);
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_TRUE(fs::exists(dir + "/run/checkpoints/step-00000002/rank-00001.h5")) << "rank 1 writes its ranges";
  r = run(kMpirun + args + " --resume --steps 3");
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_TRUE(fs::exists(dir + "/run/checkpoints/step-00000003/manifest.pb")) << r.output;
  std::ifstream m(dir + "/run/metrics.jsonl");
  std::string line, last;
  while (std::getline(m, line)) last = line;
  EXPECT_NE(last.find("\"comm.param_gather_ms\""), std::string::npos) << last;
}

}  // namespace
