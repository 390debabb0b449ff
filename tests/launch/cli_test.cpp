// The executables as a user runs them: exit codes, one-line errors that name the file or field, and
// nothing damaged by a refused command.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <thread>
#include <vector>

#include "tests/run_command.h"

namespace {

namespace fs = std::filesystem;

using Result = hydra::testing::CommandResult;
Result run(const std::string& cmd) { return hydra::testing::run_command(cmd); }

std::string temp_dir(const std::string& name) {
  const fs::path p =
      fs::temp_directory_path() / ("hydra_cli_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p.string();
}

const std::string kTrain = HYDRA_BIN_DIR "/hydra-train";
const std::string kData = HYDRA_BIN_DIR "/hydra-data";
const std::string kParams = HYDRA_BIN_DIR "/hydra-params";
const std::string kEval = HYDRA_BIN_DIR "/hydra-eval";
const std::string kCkpt = HYDRA_BIN_DIR "/hydra-ckpt";
const std::string kGenerate = HYDRA_BIN_DIR "/hydra-generate";
const std::string kTiny = HYDRA_SOURCE_DIR "/configs/tiny.pbtxt";
// A quick run of tiny: 2 steps, short sequences, no curriculum.
const std::string kQuick =
    " --set 'curriculum={}' --set train.steps=2 --set train.seq_len=64 --set train.batch_size=2 "
    "--set train.eval_batches=1 --quiet ";

TEST(Cli, HelpExplainsEveryFlag) {
  const Result r = run(kTrain + " --help");
  EXPECT_EQ(r.code, 0);
  for (const char* flag : {"--config", "--set", "--out", "--resume", "--steps", "--eval-every",
                           "--save-every", "--stats-every", "--seed"})
    EXPECT_NE(r.output.find(flag), std::string::npos) << flag;
}

TEST(Cli, ProfileTablesTheKernelsAfterTheReport) {
  const std::string dir = temp_dir("profile");
  std::string quick = kQuick;
  quick.replace(quick.find("--quiet"), 7, "--no-print-config");
  const Result r =
      run("HYDRA_PROFILE=1 " + kTrain + " --config " + kTiny + quick + " --out " + dir + "/run");
  EXPECT_EQ(r.code, 0) << r.output;
  const std::size_t table = r.output.find("kernel profile (HYDRA_PROFILE)");
  ASSERT_NE(table, std::string::npos) << r.output;
  EXPECT_GT(table, r.output.find("Hydra training report")) << "the table comes after the report";
  for (const char* kernel :
       {"gemm", "selective_scan_fwd", "selective_scan_bwd", "multi_adamw_step"})
    EXPECT_NE(r.output.find(kernel, table), std::string::npos) << kernel;
  EXPECT_EQ(run(kTrain + " --config " + kTiny + quick + " --out " + dir + "/plain")
                .output.find("kernel profile"),
            std::string::npos)
      << "off without HYDRA_PROFILE";
  // --quiet drops the progress and the report, not the table asked for by name.
  const Result q =
      run("HYDRA_PROFILE=1 " + kTrain + " --config " + kTiny + kQuick + " --out " + dir + "/quiet");
  EXPECT_EQ(q.code, 0) << q.output;
  EXPECT_NE(q.output.find("kernel profile (HYDRA_PROFILE)"), std::string::npos) << q.output;
  EXPECT_EQ(q.output.find("Hydra training report"), std::string::npos) << q.output;
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
  Result r =
      run(kTrain + " --config " + kTiny + " --out " + dir + "/run --set model.moe.max_active=9");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("model.moe.max_active = 9 must be <= num_experts (4)"), std::string::npos)
      << r.output;
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
  r = run(kTrain + " --config " + kTiny + " --out " + dir + "/run --resume auto --steps 4" +
          kQuick);
  EXPECT_EQ(r.code, 0) << r.output;
}

// Run lineage: resuming from a checkpoint older than the run's newest is refused without --force
// (nothing moves); with --force the newer checkpoints and their metrics move to
// abandoned/branch-1/, lineage.jsonl records the branch, the new lines say "branch": 1, and a later
// --resume auto continues the new branch, not the abandoned one.
TEST(Cli, ResumingFromAnOlderCheckpointStartsANamedBranchOnlyWithForce) {
  const std::string dir = temp_dir("lineage"), out = dir + "/run";
  const std::string quick =
      " --set 'curriculum={}' --set train.steps=8 --set train.seq_len=64 --set train.batch_size=2 "
      "--set train.eval_batches=1 --set train.keep_last=10 --quiet --eval-every 0 ";
  Result r =
      run(kTrain + " --config " + kTiny + " --out " + out + quick + "--save-every 2 --steps 6");
  ASSERT_EQ(r.code, 0) << r.output;
  const std::string ckpt2 = out + "/checkpoints/step-00000002";
  ASSERT_TRUE(fs::exists(out + "/checkpoints/step-00000006/manifest.pb"));
  auto lines_of = [](const std::string& path) {
    std::vector<std::string> v;
    std::ifstream in(path);
    for (std::string l; std::getline(in, l);) v.push_back(l);
    return v;
  };
  // Refused: names the newer checkpoints and --force; nothing moves.
  r = run(kTrain + " --config " + kTiny + " --out " + out + quick + "--save-every 2 --steps 8 " +
          "--resume " + ckpt2);
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("step-00000006"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("--force"), std::string::npos) << r.output;
  EXPECT_TRUE(fs::exists(out + "/checkpoints/step-00000006/manifest.pb"));
  EXPECT_FALSE(fs::exists(out + "/lineage.jsonl"));
  EXPECT_EQ(lines_of(out + "/metrics.jsonl").size(), 6u);
  // --force: a new branch from step 2.
  r = run(kTrain + " --config " + kTiny + " --out " + out + quick + "--save-every 2 --steps 5 " +
          "--resume " + ckpt2 + " --force");
  ASSERT_EQ(r.code, 0) << r.output;
  const std::string gone = out + "/abandoned/branch-1";
  for (const char* s : {"step-00000004", "step-00000006"})
    EXPECT_TRUE(fs::exists(gone + "/checkpoints/" + s + "/manifest.pb")) << s;
  EXPECT_FALSE(fs::exists(out + "/checkpoints/step-00000006"));
  EXPECT_EQ(lines_of(gone + "/metrics.jsonl").size(), 4u);  // steps 3-6 of the first history
  const std::vector<std::string> lineage = lines_of(out + "/lineage.jsonl");
  ASSERT_EQ(lineage.size(), 1u);
  EXPECT_NE(lineage[0].find("\"branch\": 1"), std::string::npos) << lineage[0];
  EXPECT_NE(lineage[0].find("\"step\": 2"), std::string::npos) << lineage[0];
  std::vector<std::string> metrics = lines_of(out + "/metrics.jsonl");
  ASSERT_EQ(metrics.size(), 5u);
  EXPECT_NE(metrics[1].find("\"branch\": 0"), std::string::npos) << metrics[1];
  EXPECT_NE(metrics[4].find("\"branch\": 1"), std::string::npos) << metrics[4];
  // --resume auto continues branch 1 from its own newest checkpoint (step 5, the leg's end).
  r = run(kTrain + " --config " + kTiny + " --out " + out + quick + "--save-every 2 --steps 7 " +
          "--resume auto");
  ASSERT_EQ(r.code, 0) << r.output;
  metrics = lines_of(out + "/metrics.jsonl");
  ASSERT_EQ(metrics.size(), 7u);
  EXPECT_NE(metrics[6].find("\"step\": 7"), std::string::npos) << metrics[6];
  EXPECT_NE(metrics[6].find("\"branch\": 1"), std::string::npos) << metrics[6];
  EXPECT_EQ(lines_of(out + "/lineage.jsonl").size(), 1u);
}

// hydra-eval on a run reproduces the trainer's own evaluation at the checkpoint's step (the same
// held-out batches, stage and weights), writes nothing into the run, and refuses what is not a
// checkpoint with a message that says what to pass.
TEST(Cli, EvalReproducesTheRunsLastEvaluationAndRefusesNonCheckpoints) {
  const std::string dir = temp_dir("eval");
  const Result train = run(kTrain + " --config " + kTiny + " --out " + dir + kQuick);
  ASSERT_EQ(train.code, 0) << train.output;
  std::ifstream metrics(dir + "/metrics.jsonl");
  std::string line, last_eval;
  while (std::getline(metrics, line))
    if (line.find("\"eval.loss\"") != std::string::npos) last_eval = line;
  ASSERT_FALSE(last_eval.empty()) << "no evaluation in metrics.jsonl";
  auto field = [](const std::string& json, const std::string& key) {
    const auto at = json.find("\"" + key + "\": ");
    return at == std::string::npos ? NAN : std::stod(json.substr(at + key.size() + 4));
  };
  const auto files_before = std::distance(fs::recursive_directory_iterator(dir), {});
  const Result ev = run(kEval + " " + dir + " --json -");
  ASSERT_EQ(ev.code, 0) << ev.output;
  EXPECT_NEAR(field(ev.output, "loss"), field(last_eval, "eval.loss"), 1e-6) << ev.output;
  EXPECT_NEAR(field(ev.output, "bits_per_byte"), field(ev.output, "loss") / std::log(2.0), 1e-6);
  EXPECT_EQ(field(ev.output, "step"), 2) << ev.output;
  EXPECT_EQ(std::distance(fs::recursive_directory_iterator(dir), {}), files_before)
      << "hydra-eval wrote into the run";
  // The checkpoint itself, as a table.
  const Result table = run(kEval + " " + dir + "/checkpoints/step-00000002");
  EXPECT_EQ(table.code, 0) << table.output;
  EXPECT_NE(table.output.find("held-out loss"), std::string::npos) << table.output;
  // Not a checkpoint: exit 1, naming what was expected.
  const Result bad = run(kEval + " " + kTiny);
  EXPECT_EQ(bad.code, 1) << bad.output;
  EXPECT_NE(bad.output.find("neither a checkpoint"), std::string::npos) << bad.output;
  const Result none = run(kEval);
  EXPECT_EQ(none.code, 2) << none.output;
  fs::remove_all(dir);
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

// hydra-ckpt: inspect names the step and every tensor; verify passes an intact checkpoint and names
// the tensor whose bytes were changed; export writes a safetensors file whose header and data agree
// with the checkpoint; foreign and damaged input is refused with a reason.
TEST(Cli, CheckpointToolInspectsVerifiesAndExports) {
  const std::string dir = temp_dir("ckpt");
  const Result train = run(kTrain + " --config " + kTiny + " --out " + dir + kQuick);
  ASSERT_EQ(train.code, 0) << train.output;
  const std::string ckpt = dir + "/checkpoints/step-00000002";
  Result r = run(kCkpt + " inspect " + dir);
  EXPECT_EQ(r.code, 0) << r.output;
  for (const char* s : {"step 2", "param/embedding", "adam_m/embedding", "rank-00000.h5"})
    EXPECT_NE(r.output.find(s), std::string::npos) << s << "\n" << r.output;
  r = run(kCkpt + " inspect " + ckpt + " --json -");
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("\"step\": 2"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("\"crc32c\": "), std::string::npos) << r.output;
  r = run(kCkpt + " verify " + dir);
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("every checksum and every slice verified"), std::string::npos)
      << r.output;

  // Export: 8 bytes of header length, the JSON header, then the data it describes.
  r = run(kCkpt + " export " + dir + " --out " + dir + "/model.safetensors");
  ASSERT_EQ(r.code, 0) << r.output;
  const std::string st = read_file(dir + "/model.safetensors");
  ASSERT_GT(st.size(), 8u);
  uint64_t len = 0;
  for (int i = 7; i >= 0; --i) len = (len << 8) | static_cast<unsigned char>(st[i]);
  ASSERT_EQ(len % 8, 0u);
  ASSERT_LE(8 + len, st.size());
  const std::string header = st.substr(8, len);
  const std::string entry = "\"embedding\": {\"dtype\": \"F32\", \"shape\": [256, 64], ";
  const auto at = header.find(entry);
  ASSERT_NE(at, std::string::npos) << header.substr(0, 400);
  EXPECT_EQ(header.find("adam_"), std::string::npos) << "the optimizer state is not exported";
  EXPECT_NE(header.find("\"hydra_step\": \"2\""), std::string::npos);
  const auto offsets = header.substr(at + entry.size());
  int64_t begin = -1, end = -1;
  ASSERT_EQ(std::sscanf(offsets.c_str(), "\"data_offsets\": [%ld, %ld]", &begin, &end), 2);
  ASSERT_EQ(end - begin, 256 * 64 * 4);
  // The largest end offset is the data's size: nothing missing, nothing after it.
  int64_t last = 0;
  for (std::size_t p = header.find("\"data_offsets\": ["); p != std::string::npos;
       p = header.find("\"data_offsets\": [", p + 1)) {
    int64_t b = 0, e = 0;
    ASSERT_EQ(std::sscanf(header.c_str() + p, "\"data_offsets\": [%ld, %ld]", &b, &e), 2);
    last = std::max(last, e);
  }
  EXPECT_EQ(8 + len + static_cast<uint64_t>(last), st.size());

  // The embedding's bytes, found in the rank file and changed there: verify names the tensor.
  const std::string emb = st.substr(8 + len + begin, 64);
  std::string rank = read_file(ckpt + "/rank-00000.h5");
  const auto where = rank.find(emb);
  ASSERT_NE(where, std::string::npos) << "the embedding's bytes are not stored as exported";
  rank[where + 10] = static_cast<char>(rank[where + 10] ^ 0x40);
  std::ofstream(ckpt + "/rank-00000.h5", std::ios::binary) << rank;
  r = run(kCkpt + " verify " + ckpt);
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("param/embedding in rank-00000.h5 fails its checksum"), std::string::npos)
      << r.output;
  r = run(kCkpt + " export " + ckpt + " --out " + dir + "/bad.safetensors");
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_FALSE(fs::exists(dir + "/bad.safetensors")) << "nothing exported from damaged data";

  // Foreign and damaged input.
  fs::create_directories(dir + "/foreign");
  std::ofstream(dir + "/foreign/manifest.pb") << "not a manifest";
  r = run(kCkpt + " inspect " + dir + "/foreign");
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("manifest.pb is damaged"), std::string::npos) << r.output;
  r = run(kCkpt + " inspect " + kTiny);
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("neither a checkpoint"), std::string::npos) << r.output;
  EXPECT_EQ(run(kCkpt + " frob " + dir).code, 2);
  EXPECT_EQ(run(kCkpt + " export " + dir).code, 2) << "export without --out";
  EXPECT_EQ(run(kCkpt + " export " + dir + " --out x --dtype i32").code, 2);
  fs::remove_all(dir);
}

// hydra-generate continues a prompt from a run's checkpoint (text with the prompt first, or JSON),
// the same seed gives the same samples, and bad requests are refused with the reason.
TEST(Cli, GenerateContinuesAPromptAndRefusesBadRequests) {
  const std::string dir = temp_dir("generate");
  const Result train = run(kTrain + " --config " + kTiny + " --out " + dir + kQuick);
  ASSERT_EQ(train.code, 0) << train.output;
  Result r = run(kGenerate + " " + dir + " --prompt 'F ' --temperature 0 -n 6 --json - -q");
  ASSERT_EQ(r.code, 0) << r.output;
  for (const char* s : {"\"step\": 2", "\"prompt_tokens\": 2", "\"decode_steps\": 5",
                        "\"tokens\": 6", "\"ended_by\": \"length\""})
    EXPECT_NE(r.output.find(s), std::string::npos) << s << "\n" << r.output;
  const std::string sampled = " --prompt 'R ab:7 ?ab:' --samples 2 --seed 4 --top-p 0.9 -n 8 -q";
  r = run(kGenerate + " " + dir + sampled);
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_EQ(r.output, run(kGenerate + " " + dir + sampled).output) << "the same seed";
  EXPECT_NE(r.output.find("--- sample 2 (length) ---\nR ab:7 ?ab:"), std::string::npos) << r.output;
  r = run(kGenerate + " " + dir + "/checkpoints/step-00000002 --prompt 'C ab|' -n 3");
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_EQ(r.output.rfind("C ab|", 0), 0u) << "the text starts with the prompt: " << r.output;
  EXPECT_NE(r.output.find("tokens/s per sample"), std::string::npos) << r.output;

  // Bad requests.
  std::ofstream(dir + "/long.txt") << std::string(300, 'a');
  r = run(kGenerate + " " + dir + " --prompt-file " + dir + "/long.txt");
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("300 tokens, longer than the model's model.max_seq_len = 256"),
            std::string::npos)
      << r.output;
  r = run(kGenerate + " " + dir);
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("give a prompt"), std::string::npos) << r.output;
  EXPECT_EQ(run(kGenerate + " " + dir + " --prompt a --temperature -1").code, 2);
  EXPECT_EQ(run(kGenerate + " " + dir + " --prompt a --prompt-file x").code, 2);
  r = run(kGenerate + " " + kTiny + " --prompt a");
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("neither a checkpoint"), std::string::npos) << r.output;
  std::ofstream(dir + "/checkpoints/step-00000002/manifest.pb") << "damaged";
  r = run(kGenerate + " " + dir + "/checkpoints/step-00000002 --prompt a");
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("manifest.pb"), std::string::npos) << r.output;
  fs::remove_all(dir);
}

// --steps past the curriculum's end is announced, with the stage and rate those steps use.
TEST(Cli, StepsPastTheScheduleAreAnnounced) {
  const std::string dir = temp_dir("past");
  std::string quick = kQuick;
  quick.replace(quick.find("--quiet"), 7, "--no-print-config");
  const Result r = run(kTrain + " --config " + kTiny + " --out " + dir + quick + " --steps 3");
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("note: --steps 3 goes past the curriculum's end at step 2: steps 3-3 "
                          "train in the last stage ('train') at its final learning rate"),
            std::string::npos)
      << r.output;
  fs::remove_all(dir);
}

// DIR/corpus/doc{0,1,2}.txt: 400 numbered sentences each, each followed by `end`.
void write_corpus(const std::string& dir, const char* end) {
  fs::create_directories(dir + "/corpus");
  for (int i = 0; i < 3; ++i) {
    std::ofstream f(dir + "/corpus/doc" + std::to_string(i) + ".txt");
    for (int k = 0; k < 400; ++k)
      f << "the quick brown fox " << k << " jumps over the lazy dog." << end;
  }
}

TEST(Cli, DataToolMakesShardsTheTrainerReads) {
  const std::string dir = temp_dir("data");
  write_corpus(dir, " ");
  Result r = run(kData + " train-bpe --vocab 300 --out " + dir + "/tok.bpe " + dir + "/corpus");
  ASSERT_EQ(r.code, 0) << r.output;
  r = run(kData + " tokenize --tokenizer " + dir + "/tok.bpe --out " + dir + "/shards " + dir +
          "/corpus");
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_TRUE(fs::exists(dir + "/shards/shard-00000.h5"));
  r = run(kData + " inspect " + dir + "/shards/shard-00000.h5");
  EXPECT_NE(r.output.find("3 documents"), std::string::npos) << r.output;
  r = run(kTrain + " --config " + kTiny + " --out " + dir + "/run" + kQuick +
          " --set model.vocab_size=300 --set data.shards=" + dir +
          "/shards --set data.tokenizer=" + dir + "/tok.bpe");
  EXPECT_EQ(r.code, 0) << r.output;
  // Bits per byte: the held-out targets decoded by the BPE hold more than one byte a token (the
  // corpus repeats its words), at most the longest piece's; byte shards, exactly one.
  auto field = [](const std::string& json, const std::string& key) {
    const auto at = json.find("\"" + key + "\": ");
    return at == std::string::npos ? NAN : std::atof(json.c_str() + at + key.size() + 4);
  };
  r = run(kEval + " " + dir + "/run --json -");
  ASSERT_EQ(r.code, 0) << r.output;
  const double bpt = field(r.output, "bits_per_token"), bpb = field(r.output, "bits_per_byte");
  EXPECT_GT(bpt / bpb, 1.5) << r.output;
  EXPECT_LT(bpt / bpb, 12.0) << r.output;
  r = run(kData + " tokenize --out " + dir + "/byte-shards " + dir + "/corpus");
  ASSERT_EQ(r.code, 0) << r.output;
  r = run(kTrain + " --config " + kTiny + " --out " + dir + "/byte-run" + kQuick +
          " --set data.shards=" + dir + "/byte-shards");
  ASSERT_EQ(r.code, 0) << r.output;
  r = run(kEval + " " + dir + "/byte-run --json -");
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NEAR(field(r.output, "bits_per_byte"), field(r.output, "bits_per_token"), 1e-9)
      << r.output;
  // BPE shards and no tokenizer to decode them: the bytes are unknown, and the table says how.
  r = run(kEval + " " + dir + "/run --set data.tokenizer=");
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("bits per byte: unknown"), std::string::npos) << r.output;
  // No held-out tokens: refused at start-up (it failed at the first evaluation, after training).
  r = run(kTrain + " --config " + kTiny + " --out " + dir + "/run0" + kQuick +
          " --set model.vocab_size=300 --set data.eval_fraction=0 --set data.shards=" + dir +
          "/shards");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("data.eval_fraction = 0 leaves no held-out tokens"), std::string::npos)
      << r.output;
  EXPECT_FALSE(fs::exists(dir + "/run0/metrics.jsonl"));
  // A missing tokenizer file, a damaged one.
  r = run(kData + " tokenize --tokenizer " + dir + "/none.bpe --out " + dir + "/x " + dir +
          "/corpus");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("none.bpe: cannot open the tokenizer file"), std::string::npos)
      << r.output;
  std::ofstream(dir + "/bad.bpe") << "hydra-bpe 1\n5\n1 2\n";
  r = run(kTrain + " --config " + kTiny + " --out " + dir + "/run2" + kQuick +
          " --set model.vocab_size=300 --set data.shards=" + dir +
          "/shards --set data.tokenizer=" + dir + "/bad.bpe");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("bad.bpe: truncated"), std::string::npos) << r.output;
}

// A SentencePiece model (learned here with hydra-data train-spm; corpora usually bring their own)
// tokenizes shards the trainer reads; a model that is not the shards' is refused by its id.
TEST(Cli, SentencePieceModelTokenizesShardsTheTrainerReads) {
#if defined(HYDRA_SANITIZE)
  GTEST_SKIP()
      << "SentencePiece's library is opened with RTLD_DEEPBIND, which AddressSanitizer refuses";
#endif
  const std::string dir = temp_dir("spm");
  write_corpus(dir, "\n");
  Result r = run(kData + " train-spm --vocab 64 --out " + dir + "/tok.model " + dir + "/corpus");
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("SentencePiece model of 64 pieces"), std::string::npos) << r.output;
  r = run(kData + " tokenize --tokenizer " + dir + "/tok.model --out " + dir + "/shards " + dir +
          "/corpus");
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("tokenizer spm-"), std::string::npos) << r.output;
  r = run(kTrain + " --config " + kTiny + " --out " + dir + "/run" + kQuick +
          " --set model.vocab_size=64 --set data.shards=" + dir +
          "/shards --set data.tokenizer=" + dir + "/tok.model");
  EXPECT_EQ(r.code, 0) << r.output;
  // Bits per byte through the model's pieces: this corpus has 1.03 bytes a piece (58,470 bytes in
  // 56,952 pieces: the 64 pieces are mostly characters); each piece decodes to one byte or more.
  r = run(kEval + " " + dir + "/run --batches 8");
  EXPECT_EQ(r.code, 0) << r.output;
  const std::size_t per_byte = r.output.find(" bits per byte of the held-out text");
  ASSERT_NE(per_byte, std::string::npos) << r.output;
  const std::size_t per_token = r.output.find(" bits per token");
  ASSERT_NE(per_token, std::string::npos) << r.output;
  const double bpb = std::atof(r.output.c_str() + r.output.rfind(' ', per_byte - 1) + 1),
               bpt = std::atof(r.output.c_str() + r.output.rfind(' ', per_token - 1) + 1);
  EXPECT_GE(bpt / bpb, 1.0) << r.output;
  EXPECT_LT(bpt / bpb, 1.1) << r.output;
  ASSERT_EQ(
      run(kData + " train-spm --vocab 50 --out " + dir + "/other.model " + dir + "/corpus").code,
      0);
  r = run(kTrain + " --config " + kTiny + " --out " + dir + "/run2" + kQuick +
          " --set model.vocab_size=64 --set data.shards=" + dir +
          "/shards --set data.tokenizer=" + dir + "/other.model");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("is not the tokenizer the shards were made with"), std::string::npos)
      << r.output;
  std::ofstream(dir + "/junk.model") << "junk";
  r = run(kData + " tokenize --tokenizer " + dir + "/junk.model --out " + dir + "/x " + dir +
          "/corpus");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("junk.model: not a SentencePiece model"), std::string::npos) << r.output;
  fs::remove_all(dir);
}

// Bad input found by the fault-and-bad-input trial (issue 21): each is refused with a message
// naming the file, field or flag, before anything is written or allocated.
TEST(BadInput, NonFiniteNumbersAnywhereInTheConfigAreRefused) {
  const std::string dir = temp_dir("finite");
  Result r = run(kTrain + " --config " + kTiny + " --out " + dir + "/a" + kQuick +
                 " --set train.lr.lr=nan");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("train.lr.lr = nan must be a finite number"), std::string::npos)
      << r.output;
  r = run(kTrain + " --config " + kTiny + " --out " + dir + "/b" + kQuick +
          " --set model.init_std=inf");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("model.init_std = inf must be a finite number"), std::string::npos)
      << r.output;
  r = run(kParams + " " + kTiny + " --set model.ssm.dt_max=-inf");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("model.ssm.dt_max = -inf must be a finite number"), std::string::npos)
      << r.output;
  EXPECT_FALSE(fs::exists(dir + "/a"));
  EXPECT_FALSE(fs::exists(dir + "/b"));
}

TEST(BadInput, ConfigThatIsADirectoryOrEmptyIsRefused) {
  const std::string dir = temp_dir("cfgfile");
  Result r = run(kTrain + " --config " + dir + " --out " + dir + "/run");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find(dir + ": is a directory, not a config file"), std::string::npos)
      << r.output;
  std::ofstream(dir + "/empty.pbtxt") << "# nothing but a comment\n";
  r = run(kTrain + " --config " + dir + "/empty.pbtxt --out " + dir + "/run");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("empty.pbtxt: the config sets nothing"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(dir + "/run"));
}

TEST(BadInput, NegativeFlagsAndStageSizesAreRefused) {
  const std::string dir = temp_dir("negative");
  for (const char* flag :
       {"--steps -1", "--steps 0", "--threads 0", "--stats-every 0", "--save-every -2"}) {
    const Result r = run(kTrain + " --config " + kTiny + " --out " + dir + "/run " + flag);
    EXPECT_EQ(r.code, 2) << flag;
    EXPECT_NE(r.output.find("must be >="), std::string::npos) << flag << ": " << r.output;
  }
  std::ifstream in(kTiny);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const std::string first = "steps: 60 seq_len: 128";  // the first stage's
  ASSERT_NE(text.find(first), std::string::npos);
  text.replace(text.find(first), first.size(), "steps: 60 seq_len: -64");
  std::ofstream(dir + "/neg.pbtxt") << text;
  const Result r = run(kTrain + " --config " + dir + "/neg.pbtxt --out " + dir + "/run");
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("curriculum.stage[0].seq_len = -64 must be >= 0"), std::string::npos)
      << r.output;
  EXPECT_FALSE(fs::exists(dir + "/run"));
  const Result lr = run(kTrain + " --config " + kTiny + " --out " + dir + "/run" +
                        " --set train.optimizer.router_lr=-0.01");
  EXPECT_EQ(lr.code, 1) << lr.output;
  EXPECT_NE(lr.output.find("train.optimizer.router_lr = -0.01 must be >= 0"), std::string::npos)
      << lr.output;
}

TEST(BadInput, HugeSizesNameTheFieldAndModelsThatCannotFitAreRefused) {
  const std::string dir = temp_dir("huge");
  Result r = run(kParams + " " + kTiny + " --set model.d_model=1000000000");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("model.d_model = 1000000000 must be <= 65536"), std::string::npos)
      << r.output;
  r = run(kParams + " " + kTiny + " --set model.moe.num_experts=100000");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.output.find("model.moe.num_experts = 100000 must be <= 1024"), std::string::npos)
      << r.output;
  // Within the bounds but far beyond this machine's memory: refused before allocating, sizes named.
  r = run(kTrain + " --config " + kTiny + " --out " + dir + "/run" + kQuick +
          " --set model.d_model=65536 --set model.vocab_size=16000000 --set model.num_blocks=64");
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("GiB of host memory (model.d_model = 65536"), std::string::npos)
      << r.output;
  EXPECT_FALSE(fs::exists(dir + "/run/metrics.jsonl"));
  // Found by AcceptedValues.*: each was accepted, then failed inside (an allocation failure, a
  // convolution the CUDA kernels do not take) or never ended. A scan chunk longer than the
  // sequence is one chunk (the CPU's backward sized its buffers by the chunk: 10^9 steps).
  r = run(kTrain + " --config " + kTiny + " --out " + dir + "/chunk" + kQuick +
          " --set model.ssm.scan_chunk=16777216");
  EXPECT_EQ(r.code, 0) << r.output;
  for (const auto& [sets, message] : std::vector<std::pair<std::string, std::string>>{
           {"--set model.ssm.scan_chunk=1000000000",
            "model.ssm.scan_chunk = 1000000000 must be in [1, 16777216]"},
           {"--set train.device=cuda --set model.ssm.conv_width=9",
            "model.ssm.conv_width = 9: the CUDA kernels take widths up to 8"},
           {"--set train.eval_batches=1000000000",
            "train.eval_batches = 1000000000 must be in [1, 1000000]"}}) {
    r = run(kTrain + " --config " + kTiny + " --out " + dir + "/run" + kQuick + " " + sets);
    EXPECT_EQ(r.code, 1) << r.output;
    EXPECT_NE(r.output.find(message), std::string::npos) << r.output;
  }
  EXPECT_FALSE(fs::exists(dir + "/run/metrics.jsonl"));
}

// SIGTERM (what Slurm sends at cancellation or preemption) stops the run at the end of a step with
// a checkpoint, and the exit code says so: 128 + 15, not 0 (a scheduler would mark the job
// completed).
TEST(Cli, SigtermSavesAndExitsWith143) {
  const std::string dir = temp_dir("sigterm");
  std::string talk = kQuick;
  talk.replace(talk.find("--quiet"), 7, "--no-print-config");
  const Result r = run(
      "(" + kTrain + " --config " + kTiny + " --out " + dir + "/run" + talk +
      " --set train.steps=100000 & pid=$!; for i in $(seq 300); do [ -s " + dir +
      "/run/metrics.jsonl ] && break; sleep 0.1; done; kill -TERM $pid; wait $pid; echo rc=$?)");
  EXPECT_NE(r.output.find("rc=143"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("received SIGTERM (15)"), std::string::npos) << r.output;
  // The report does not show an evaluation that did not run (it printed "eval: loss 0.0000").
  EXPECT_NE(r.output.find("eval: none in this leg"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("eval: loss 0.0000"), std::string::npos) << r.output;
  EXPECT_TRUE(fs::exists(dir + "/run/checkpoints")) << r.output;
}

// A batch too large for host memory: the loader's thread used to die in std::bad_alloc (abort); now
// the run stops with a message that names the sizes and what to change.
TEST(BadInput, BatchBeyondHostMemoryIsAnErrorNotAnAbort) {
  const std::string dir = temp_dir("hugebatch");
  const Result r = run(kTrain + " --config " + kTiny + " --out " + dir + "/run" + kQuick +
                       " --set train.batch_size=1000000000000");
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(
      r.output.find(
          "out of host memory building the batch of step 0 (1000000000000 sequences of 64 tokens)"),
      std::string::npos)
      << r.output;
}

// A kill right after a checkpoint is published (injected: the process exits there) keeps that
// step's metrics line: the metrics are flushed before the publish, and the resumed run continues
// after it.
TEST(Faults, KillRightAfterPublishKeepsTheStepsMetrics) {
  const std::string dir = temp_dir("publishkill");
  Result r = run("HYDRA_FAULT_EXIT_AFTER_PUBLISH=1 " + kTrain + " --config " + kTiny + " --out " +
                 dir + "/run" + kQuick + " --set train.steps=4 --set train.save_every=2");
  EXPECT_EQ(r.code, 137) << r.output;
  ASSERT_TRUE(fs::exists(dir + "/run/checkpoints/step-00000002/manifest.pb")) << r.output;
  auto lines = [&] {
    std::ifstream in(dir + "/run/metrics.jsonl");
    std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    return all;
  };
  EXPECT_NE(lines().find("{\"step\": 2,"), std::string::npos)
      << "the published step's line was lost";
  r = run(kTrain + " --config " + kTiny + " --out " + dir + "/run --resume auto" + kQuick +
          " --set train.steps=4 --set train.save_every=2");
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_NE(lines().find("{\"step\": 4,"), std::string::npos);
}

// A kill while keep_last removes an old checkpoint (injected: the process exits after the manifest
// and one more file of step 1 are gone) leaves no folder that looks complete and is not: step 1 has
// no manifest (resume skips it), every folder with one verifies, and the resumed run ends with the
// leftover removed by its next publish. Removing the files in directory order had left a manifest
// without its shard (random_kills.sh, session 43).
TEST(Faults, KillDuringARemovalLeavesNoDamagedCheckpoint) {
  const std::string dir = temp_dir("retirekill"), run_dir = dir + "/run";
  const std::string args = " --config " + kTiny + " --out " + run_dir + kQuick +
                           " --set train.steps=4 --set train.save_every=1 --set train.keep_last=1";
  Result r = run("HYDRA_FAULT_EXIT_DURING_RETIRE=1 " + kTrain + args);
  EXPECT_EQ(r.code, 137) << r.output;
  const std::string ckpts = run_dir + "/checkpoints";
  EXPECT_FALSE(fs::exists(ckpts + "/step-00000001/manifest.pb")) << "a removal cut short";
  int published = 0;
  for (const auto& de : fs::directory_iterator(ckpts)) {
    if (!fs::exists(de.path() / "manifest.pb")) continue;
    ++published;
    const Result v = run(kCkpt + " verify " + de.path().string());
    EXPECT_EQ(v.code, 0) << de.path() << ": " << v.output;
  }
  EXPECT_GE(published, 1);
  r = run(kTrain + args + " --resume auto");
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_TRUE(fs::exists(ckpts + "/step-00000004/manifest.pb"));
  EXPECT_FALSE(fs::exists(ckpts + "/step-00000001")) << "the leftover folder was not removed";
}

// A kill while a background save writes its files (injected: the process exits after the first
// tensor of step 4's checkpoint) loses nothing published: step 2's checkpoint was published before
// (at the first step boundary after its write), verifies, and the run resumes from it and ends. The
// half-written step 4 never appears as a checkpoint (a .tmp folder, removed by the next publish).
TEST(Faults, KillDuringABackgroundWriteLosesNothingPublished) {
  const std::string dir = temp_dir("writekill"), run_dir = dir + "/run";
  const std::string args = " --config " + kTiny + " --out " + run_dir + kQuick +
                           " --set train.steps=6 --set train.save_every=2";
  Result r = run("HYDRA_FAULT_EXIT_DURING_WRITE=4 " + kTrain + args);
  EXPECT_EQ(r.code, 137) << r.output;
  const std::string good = run_dir + "/checkpoints/step-00000002";
  ASSERT_TRUE(fs::exists(good + "/manifest.pb")) << r.output;
  EXPECT_FALSE(fs::exists(run_dir + "/checkpoints/step-00000004")) << r.output;
  EXPECT_TRUE(fs::exists(run_dir + "/checkpoints/step-00000004.tmp")) << "the write was not killed";
  r = run(kCkpt + " verify " + good);
  EXPECT_EQ(r.code, 0) << r.output;
  r = run(kTrain + args + " --resume auto");
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_TRUE(fs::exists(run_dir + "/checkpoints/step-00000006/manifest.pb")) << r.output;
  EXPECT_FALSE(fs::exists(run_dir + "/checkpoints/step-00000004.tmp"));
}

// A diverging run (a learning rate far too high) stops with exit code 3 and advice that is true: no
// "resume" when no checkpoint exists; the checkpoint that exists, when one does.
TEST(Faults, DivergenceAdviceNamesOnlyCheckpointsThatExist) {
  const std::string dir = temp_dir("diverge");
  Result r = run(kTrain + " --config " + kTiny + " --out " + dir + "/a" + kQuick +
                 " --set train.steps=30 --set train.lr.lr=1e9");
  EXPECT_EQ(r.code, 3) << r.output;
  EXPECT_NE(r.output.find("No checkpoint was written yet: start the run again"), std::string::npos)
      << r.output;
  EXPECT_EQ(r.output.find("--resume"), std::string::npos) << r.output;
  r = run(kTrain + " --config " + kTiny + " --out " + dir + "/b" + kQuick +
          " --set train.steps=4 --set train.save_every=2");
  ASSERT_EQ(r.code, 0) << r.output;
  r = run(kTrain + " --config " + kTiny + " --out " + dir + "/b --resume auto" + kQuick +
          " --set train.steps=30 --set train.save_every=100 --set train.lr.lr=1e9");
  EXPECT_EQ(r.code, 3) << r.output;
  const std::string ckpt = dir + "/b/checkpoints/step-00000004";
  EXPECT_NE(r.output.find("The last good checkpoint is " + ckpt +
                          ": resume from it with --resume " + ckpt),
            std::string::npos)
      << r.output;
  EXPECT_TRUE(fs::exists(ckpt + "/manifest.pb"));
}

// The NaN guard's advice with a checkpoint after every step: the checkpoint written just before the
// failing step holds the weights that fail, so it must not be called good; the one named good is
// older, exists, and its next step was finite (the run went on past it).
TEST(Faults, DivergenceAdviceNeverNamesTheCheckpointOfTheFailingStep) {
  const std::string dir = temp_dir("diverge-every");
  const Result r = run(kTrain + " --config " + kTiny + " --out " + dir + "/a" + kQuick +
                       " --set train.steps=30 --set train.save_every=1 --set train.keep_last=5 " +
                       "--set train.lr.lr=1e9 --set train.lr.warmup_steps=0");
  ASSERT_EQ(r.code, 3) << r.output;
  const std::size_t bad = r.output.find("not finite");
  ASSERT_NE(bad, std::string::npos) << r.output;
  const std::size_t at = r.output.rfind("step ", bad);  // "step N: the loss is ... (not finite)"
  ASSERT_NE(at, std::string::npos) << r.output;
  const int64_t failed = std::stoll(r.output.substr(at + 5));
  ASSERT_GE(failed, 2) << r.output;
  char suspect[32];
  std::snprintf(suspect, sizeof suspect, "step-%08lld", static_cast<long long>(failed - 1));
  EXPECT_NE(r.output.find("The newest checkpoint, " + dir + "/a/checkpoints/" + suspect),
            std::string::npos)
      << r.output;
  EXPECT_EQ(r.output.find("--resume " + dir + "/a/checkpoints/" + suspect), std::string::npos)
      << r.output;
  const std::size_t good = r.output.find("The last good checkpoint is ");
  if (failed >= 3) {
    ASSERT_NE(good, std::string::npos) << r.output;
    char older[32];
    std::snprintf(older, sizeof older, "step-%08lld", static_cast<long long>(failed - 2));
    EXPECT_NE(r.output.find(dir + "/a/checkpoints/" + older + ": resume from it with --resume " +
                            dir + "/a/checkpoints/" + older + " --force"),
              std::string::npos)
        << r.output;
    // The advice works as given: from the good checkpoint, with --force past the suspect one.
    const Result again =
        run(kTrain + " --config " + kTiny + " --out " + dir + "/a" + kQuick +
            " --set train.steps=30 --set train.save_every=1 --set train.keep_last=5 --steps " +
            std::to_string(failed) + " --resume " + dir + "/a/checkpoints/" + older + " --force");
    EXPECT_EQ(again.code, 0) << again.output;
  }
}

// A disk that fills up during a save, at many points of the save (a small tmpfs; needs root, as CI
// runs): a clear message naming the file and exit code 1, never a crash (HDF5's exit handler closed
// a file whose close had failed: SIGSEGV with the tmpfs at 2.5 MB), and no published checkpoint
// damaged.
TEST(Faults, FullDiskDuringASaveIsAnErrorNotACrash) {
  const std::string dir = temp_dir("fulldisk"), mnt = dir + "/fs";
  fs::create_directories(mnt);
  if (::geteuid() != 0 || run("mount -t tmpfs -o size=1m tmpfs " + mnt).code != 0)
    GTEST_SKIP() << "needs root and tmpfs mounts (as CI runs) for a small full disk";
  run("umount " + mnt);
  for (int kb = 1024; kb <= 4096; kb += 128) {
    SCOPED_TRACE(std::to_string(kb) + " KB");
    ASSERT_EQ(run("mount -t tmpfs -o size=" + std::to_string(kb) + "k tmpfs " + mnt).code, 0);
    const Result r = run(kTrain + " --config " + kTiny + " --out " + mnt + "/run" + kQuick +
                         " --set train.steps=4 --set train.save_every=2");
    EXPECT_EQ(r.code, 1) << r.output;
    EXPECT_NE(r.output.find("(disk full?)"), std::string::npos) << r.output;
    std::error_code ec;
    for (const auto& de : fs::directory_iterator(mnt + "/run/checkpoints", ec)) {
      if (de.path().extension() == ".tmp") continue;
      EXPECT_TRUE(fs::exists(de.path() / "manifest.pb"))
          << de.path() << ": published without a manifest";
    }
    run("umount " + mnt);
  }
}

// A compressed file in a corpus was tokenised as text (its bytes), silently: refused, with the tool
// to decompress it named, and no shard written.
TEST(BadInput, CompressedCorpusFilesAreRefused) {
  const std::string dir = temp_dir("gzipped");
  fs::create_directories(dir + "/corpus");
  std::ofstream(dir + "/corpus/a.txt") << "plain text is fine\n";
  ASSERT_EQ(run("printf 'compressed text' | gzip > " + dir + "/corpus/b.txt.gz").code, 0);
  const Result r = run(kData + " tokenize --out " + dir + "/shards " + dir + "/corpus");
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(
      r.output.find("b.txt.gz: is gzip-compressed, not text; decompress it first (gunzip FILE)"),
      std::string::npos)
      << r.output;
  EXPECT_FALSE(fs::exists(dir + "/shards/shard-00000.h5"));
}

TEST(BadInput, TokenizingNothingIsAnError) {
  const std::string dir = temp_dir("emptytext");
  fs::create_directories(dir + "/corpus");
  std::ofstream(dir + "/corpus/empty.txt").close();
  const Result r = run(kData + " tokenize --out " + dir + "/shards " + dir + "/corpus");
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("holds no text: no shard written"), std::string::npos) << r.output;
}

// Under mpirun: a grid that does not fit the world, or experts that do not split over ep, stops
// every rank at start-up with one message (from rank 0) that says what to change; a good grid
// trains.
const std::string kMpirun =
    "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 HYDRA_NUM_THREADS=1 timeout "
    "300 " HYDRA_MPIEXEC " --oversubscribe -np 2 ";

int count(const std::string& text, const std::string& what) {
  int n = 0;
  for (std::size_t p = text.find(what); p != std::string::npos; p = text.find(what, p + 1)) ++n;
  return n;
}

TEST(Cli, MpirunWithABadGridStopsEveryRankWithOneClearMessage) {
  const std::string dir = temp_dir("badgrid");
  Result r = run(kMpirun + kTrain + " --config " + kTiny + " --out " + dir + "/run" + kQuick +
                 " --set parallel.dp=3");
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

// Ranks started with different configs (mpirun's MPMD form: one --set differs) stop at start-up
// with the differing line named, both values shown; before, they failed later with a bare
// MPI_ERR_TRUNCATE.
TEST(Cli, MpirunRanksWithDifferentConfigsNameTheDifference) {
  const std::string dir = temp_dir("diffcfg");
  const std::string each =
      kTrain + " --config " + kTiny + " --out " + dir + "/run" + kQuick + " --set parallel.dp=2";
  const std::string mpmd =
      "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 HYDRA_NUM_THREADS=1 timeout "
      "300 " HYDRA_MPIEXEC " --oversubscribe -np 1 " +
      each + " --set train.lr.lr=0.001 : -np 1 " + each + " --set train.lr.lr=0.002";
  const Result r = run(mpmd);
  EXPECT_NE(r.code, 0) << r.output;
  EXPECT_NE(r.code, 124) << "hung: " << r.output;
  EXPECT_NE(r.output.find(
                "the ranks' configs differ: rank 1 has 'lr: 0.002' where rank 0 has 'lr: 0.001'"),
            std::string::npos)
      << r.output;
  EXPECT_FALSE(fs::exists(dir + "/run/metrics.jsonl"));
}

TEST(Cli, MpirunTrainsOnTwoDataRanks) {
  const std::string dir = temp_dir("dp2");
  const Result r = run(kMpirun + kTrain + " --config " + kTiny + " --out " + dir + "/run" + kQuick +
                       " --set parallel.dp=2");
  ASSERT_EQ(r.code, 0) << r.output;
  std::ifstream m(dir + "/run/metrics.jsonl");
  std::string line;
  int steps = 0;
  while (std::getline(m, line))
    steps +=
        line.find("\"step\"") != std::string::npos && line.find("\"loss\"") != std::string::npos;
  EXPECT_EQ(steps, 2) << "one metrics line per step, written by rank 0 only";
}

// Ranks sharing a host share its cores: without --threads or a thread variable, four ranks each
// take at most a quarter of them (oversubscribed ranks are not bound to cores, and each took them
// all).
TEST(Cli, MpirunRanksOnOneHostShareItsCores) {
  const std::string dir = temp_dir("threads");
  const Result r = run(
      "env -u HYDRA_NUM_THREADS -u OMP_NUM_THREADS OMPI_ALLOW_RUN_AS_ROOT=1 "
      "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 timeout 300 " HYDRA_MPIEXEC " --oversubscribe -np 4 " +
      kTrain + " --config " + kTiny + " --out " + dir + "/run --no-print-config " +
      "--set 'curriculum={}' --set train.steps=1 --set train.seq_len=64 --set train.batch_size=4 " +
      "--set train.eval_batches=1 --set parallel.dp=4");
  ASSERT_EQ(r.code, 0) << r.output;
  const std::size_t at = r.output.find(" CPU threads per rank");
  ASSERT_NE(at, std::string::npos) << r.output;
  const std::size_t start = r.output.rfind("# ", at);
  const int threads = std::stoi(r.output.substr(start + 2, at - start - 2));
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  EXPECT_GE(threads, 1);
  EXPECT_LE(threads, std::max(1, cores / 4)) << r.output;
}

// ZeRO-1 from the command line: each rank writes its ranges of the optimizer state; the run
// resumes.
TEST(Cli, MpirunTrainsWithZero1AndResumes) {
  const std::string dir = temp_dir("zero1");
  const std::string args = kTrain + " --config " + kTiny + " --out " + dir + "/run" + kQuick +
                           " --set parallel.dp=2 --set parallel.zero1=true";
  Result r = run(kMpirun + args);
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_TRUE(fs::exists(dir + "/run/checkpoints/step-00000002/rank-00001.h5"))
      << "rank 1 writes its ranges";
  r = run(kMpirun + args + " --resume --steps 3");
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_TRUE(fs::exists(dir + "/run/checkpoints/step-00000003/manifest.pb")) << r.output;
  std::ifstream m(dir + "/run/metrics.jsonl");
  std::string line, last;
  while (std::getline(m, line)) last = line;
  EXPECT_NE(last.find("\"comm.param_gather_ms\""), std::string::npos) << last;
}

}  // namespace
