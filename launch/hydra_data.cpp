// hydra-data: tokenizers and token shards.
//   hydra-data train-bpe --vocab N --out FILE INPUT...
//   hydra-data train-spm --vocab N --out FILE.model INPUT...
//   hydra-data tokenize [--tokenizer bytes|FILE] --out DIR [--shard-tokens N] INPUT...
//   hydra-data inspect SHARD...
// INPUTs are text files or folders (read recursively, in name order); each file is one document.
#include <unistd.h>

#include <algorithm>
#include <boost/program_options.hpp>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>
#include <string_view>

#include "data/sentencepiece.h"
#include "data/shards.h"
#include "data/tokenizer.h"

namespace po = boost::program_options;
namespace fs = std::filesystem;
using namespace hydra;

namespace {

Expected<std::vector<std::string>> list_inputs(const std::vector<std::string>& inputs) {
  std::vector<std::string> files;
  for (const std::string& in : inputs) {
    std::error_code ec;
    if (fs::is_directory(in, ec)) {
      std::vector<std::string> found;
      for (const auto& de : fs::recursive_directory_iterator(in, ec))
        if (de.is_regular_file()) found.push_back(de.path().string());
      std::sort(found.begin(), found.end());
      files.insert(files.end(), found.begin(), found.end());
    } else if (fs::is_regular_file(in, ec)) {
      files.push_back(in);
    } else {
      return not_found(in + ": no such file or folder");
    }
  }
  if (files.empty()) return invalid_argument("no input files (name text files or folders)");
  return files;
}

// A compressed file would be tokenised as text (its bytes): refused, with the way out named.
struct Compression {
  std::string_view magic;
  const char* name;
  const char* tool;
};
const Compression* compression_of(const std::string& bytes) {
  static const Compression kinds[] = {{std::string_view("\x1f\x8b", 2), "gzip", "gunzip"},
                                      {std::string_view("\x28\xb5\x2f\xfd", 4), "zstd", "unzstd"},
                                      {std::string_view("BZh", 3), "bzip2", "bunzip2"},
                                      {std::string_view("\xfd"
                                                        "7zXZ\x00",
                                                        6),
                                       "xz", "unxz"}};
  for (const Compression& k : kinds)
    if (bytes.compare(0, k.magic.size(), k.magic) == 0) return &k;
  return nullptr;
}

Expected<std::string> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return io_error(path + ": cannot read");
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (const Compression* c = compression_of(bytes))
    return invalid_argument(path + ": is " + c->name +
                            "-compressed, not text; decompress it first (" + c->tool +
                            " FILE) or leave it out");
  return bytes;
}

class Bar {
 public:
  explicit Bar(int64_t total)
      : total_(std::max<int64_t>(total, 1)),
        tty_(isatty(STDERR_FILENO)),
        start_(std::chrono::steady_clock::now()) {}
  void update(int64_t done, const std::string& what) {
    const double s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    const double frac = double(done) / double(total_);
    const double eta = frac > 0 ? s / frac * (1 - frac) : 0;
    if (tty_) {
      std::string bar(static_cast<std::size_t>(30 * frac), '#');
      bar.resize(30, '.');
      std::fprintf(stderr, "\r[%s] %5.1f%%  %.1f MB/s  ETA %.0fs  %-30.30s", bar.c_str(),
                   100 * frac, double(done) / 1e6 / std::max(s, 1e-9), eta, what.c_str());
    } else if (frac >= next_) {
      std::fprintf(stderr, "%5.1f%%  %s\n", 100 * frac, what.c_str());
      next_ += 0.1;
    }
  }
  void done() {
    if (tty_) std::fprintf(stderr, "\n");
  }

 private:
  int64_t total_;
  bool tty_;
  double next_ = 0;
  std::chrono::steady_clock::time_point start_;
};

int train_bpe(const std::vector<std::string>& inputs, int64_t vocab, const std::string& out) {
  auto files = list_inputs(inputs);
  if (!files.ok()) {
    std::cerr << "hydra-data train-bpe: " << files.status().message() << "\n";
    return 1;
  }
  std::vector<std::string> texts;
  for (const auto& f : *files) {
    auto t = read_file(f);
    if (!t.ok()) {
      std::cerr << "hydra-data train-bpe: " << t.status().message() << "\n";
      return 1;
    }
    texts.push_back(std::move(*t));
  }
  auto bpe = data::BpeTokenizer::train(texts, vocab);
  if (!bpe.ok()) {
    std::cerr << "hydra-data train-bpe: " << bpe.status().message() << "\n";
    return 1;
  }
  const Status st = bpe->save(out);
  if (!st.ok()) {
    std::cerr << "hydra-data train-bpe: " << st.message() << "\n";
    return 1;
  }
  std::printf("wrote %s: %ld tokens (%zu merges learned from %zu files), id %s\n", out.c_str(),
              long(bpe->vocab_size()), bpe->merges().size(), files->size(), bpe->id().c_str());
  return 0;
}

int tokenize(const std::vector<std::string>& inputs, const std::string& tok_spec,
             const std::string& out_dir, int64_t shard_tokens) {
  auto tok = data::load_tokenizer(tok_spec);
  auto files = list_inputs(inputs);
  if (!tok.ok() || !files.ok()) {
    std::cerr << "hydra-data tokenize: " << (tok.ok() ? files.status() : tok.status()).message()
              << "\n";
    return 1;
  }
  std::error_code ec;
  fs::create_directories(out_dir, ec);
  int64_t total_bytes = 0;
  for (const auto& f : *files) total_bytes += static_cast<int64_t>(fs::file_size(f, ec));
  Bar bar(total_bytes);
  std::vector<int32_t> tokens;
  std::vector<int64_t> offsets;
  int shard = 0;
  int64_t done = 0, all_tokens = 0;
  auto flush = [&]() -> Status {
    if (tokens.empty()) return ok_status();
    char name[32];
    std::snprintf(name, sizeof name, "shard-%05d.h5", shard++);
    Status st = data::write_token_shard((fs::path(out_dir) / name).string(), tokens, offsets,
                                        (*tok)->id(), (*tok)->vocab_size());
    all_tokens += static_cast<int64_t>(tokens.size());
    tokens.clear();
    offsets.clear();
    return st;
  };
  for (const auto& f : *files) {
    auto text = read_file(f);
    if (!text.ok()) {
      std::cerr << "\nhydra-data tokenize: " << text.status().message() << "\n";
      return 1;
    }
    const std::vector<int32_t> t = (*tok)->encode(*text);
    if (!tokens.empty() && static_cast<int64_t>(tokens.size() + t.size()) > shard_tokens) {
      const Status st = flush();
      if (!st.ok()) {
        std::cerr << "\nhydra-data tokenize: " << st.message() << "\n";
        return 1;
      }
    }
    offsets.push_back(static_cast<int64_t>(tokens.size()));
    tokens.insert(tokens.end(), t.begin(), t.end());
    done += static_cast<int64_t>(text->size());
    bar.update(done, fs::path(f).filename().string());
  }
  const Status st = flush();
  bar.done();
  if (!st.ok()) {
    std::cerr << "hydra-data tokenize: " << st.message() << "\n";
    return 1;
  }
  if (all_tokens == 0) {
    std::cerr << "hydra-data tokenize: the input (" << files->size() << " file(s), " << total_bytes
              << " bytes) holds no text: no shard written; give files with text in them\n";
    return 1;
  }
  std::printf("wrote %d shard(s) to %s: %ld tokens from %zu documents (%ld bytes), tokenizer %s\n",
              shard, out_dir.c_str(), long(all_tokens), files->size(), long(total_bytes),
              (*tok)->id().c_str());
  return 0;
}

int inspect(const std::vector<std::string>& shards) {
  int rc = 0;
  for (const auto& p : shards) {
    auto s = data::TokenShard::open(p);
    if (!s.ok()) {
      std::cerr << "hydra-data inspect: " << s.status().message() << "\n";
      rc = 1;
      continue;
    }
    std::printf("%s: %ld tokens, %ld documents, vocabulary %ld, tokenizer %s\n", p.c_str(),
                long(s->num_tokens()), long(s->num_docs()), long(s->vocab_size()),
                s->tokenizer().c_str());
  }
  return rc;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string usage =
      "hydra-data COMMAND [options] INPUT...\n\n"
      "Commands:\n"
      "  train-bpe --vocab N --out FILE INPUT...     learn a byte-level BPE tokenizer "
      "(deterministic)\n"
      "  train-spm --vocab N --out FILE.model INPUT...  learn a SentencePiece (unigram) model\n"
      "  tokenize [--tokenizer bytes|FILE] --out DIR [--shard-tokens N] INPUT...\n"
      "                                              write HDF5 token shards (shard-NNNNN.h5) for "
      "data.shards\n"
      "  inspect SHARD...                            print what shards hold\n"
      "INPUTs are text files or folders (read recursively); each file is one document.\n\nOptions";
  po::options_description opts(usage);
  opts.add_options()("help,h", "show this help")(
      "vocab", po::value<int64_t>(), "train-bpe: vocabulary size (>= 256); train-spm: pieces")(
      "out", po::value<std::string>(),
      "train-bpe, train-spm: tokenizer file to write; tokenize: folder for the shards")(
      "tokenizer", po::value<std::string>()->default_value("bytes"),
      "tokenize: 'bytes', a train-bpe file or a SentencePiece model (FILE.model)")(
      "shard-tokens", po::value<int64_t>()->default_value(100'000'000),
      "tokenize: tokens per shard at most");
  po::options_description hidden;
  hidden.add_options()("command", po::value<std::string>())("inputs",
                                                            po::value<std::vector<std::string>>());
  po::positional_options_description pos;
  pos.add("command", 1).add("inputs", -1);
  po::options_description all;
  all.add(opts).add(hidden);
  po::variables_map vm;
  try {
    po::store(po::command_line_parser(argc, argv).options(all).positional(pos).run(), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    std::cerr << "hydra-data: " << e.what() << " (see hydra-data --help)\n";
    return 2;
  }
  if (vm.count("help") || !vm.count("command")) {
    std::cout << opts << "\n";
    return vm.count("help") ? 0 : 2;
  }
  const std::string cmd = vm["command"].as<std::string>();
  const std::vector<std::string> inputs =
      vm.count("inputs") ? vm["inputs"].as<std::vector<std::string>>() : std::vector<std::string>{};
  try {
    if (cmd == "train-bpe") {
      if (!vm.count("vocab") || !vm.count("out") || inputs.empty()) {
        std::cerr << "hydra-data train-bpe: needs --vocab N, --out FILE and text inputs\n";
        return 2;
      }
      return train_bpe(inputs, vm["vocab"].as<int64_t>(), vm["out"].as<std::string>());
    }
    if (cmd == "train-spm") {
      if (!vm.count("vocab") || !vm.count("out") || inputs.empty()) {
        std::cerr << "hydra-data train-spm: needs --vocab N, --out FILE.model and text inputs\n";
        return 2;
      }
      auto files = list_inputs(inputs);
      if (!files.ok()) {
        std::cerr << "hydra-data: " << files.status().message() << "\n";
        return 1;
      }
      const std::string out = vm["out"].as<std::string>();
      const Status st = data::SentencePieceTokenizer::train(*files, vm["vocab"].as<int64_t>(), out);
      if (!st.ok()) {
        std::cerr << "hydra-data: " << st.message() << "\n";
        return 1;
      }
      auto tok = data::SentencePieceTokenizer::load(out);
      if (!tok.ok()) {
        std::cerr << "hydra-data: " << tok.status().message() << "\n";
        return 1;
      }
      std::printf("wrote %s: SentencePiece model of %ld pieces from %zu files (id %s)\n",
                  out.c_str(), long((*tok)->vocab_size()), files->size(), (*tok)->id().c_str());
      return 0;
    }
    if (cmd == "tokenize") {
      if (!vm.count("out") || inputs.empty()) {
        std::cerr << "hydra-data tokenize: needs --out DIR and text inputs\n";
        return 2;
      }
      const int64_t per = vm["shard-tokens"].as<int64_t>();
      if (per < 1) {
        std::cerr << "hydra-data tokenize: --shard-tokens must be >= 1\n";
        return 2;
      }
      return tokenize(inputs, vm["tokenizer"].as<std::string>(), vm["out"].as<std::string>(), per);
    }
    if (cmd == "inspect") return inspect(inputs);
  } catch (const std::exception& e) {
    std::cerr << "hydra-data: internal error: " << e.what() << "\n";
    return 4;
  }
  std::cerr << "hydra-data: unknown command '" << cmd
            << "' (train-bpe, train-spm, tokenize or inspect)\n";
  return 2;
}
