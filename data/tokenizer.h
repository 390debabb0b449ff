// Tokenizers: bytes (the default, vocab 256) and a byte-level BPE trained by `hydra-data
// train-bpe`. A tokenizer has an id (stored in token shards and checked when they are read).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "base/status.h"

namespace hydra::data {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual std::vector<int32_t> encode(const std::string& text) const = 0;
  virtual std::string decode(const std::vector<int32_t>& tokens) const = 0;
  virtual int64_t vocab_size() const = 0;
  // "bytes", or "bpe-<vocab>-<hash of the merges>": equal ids mean equal tokenizations.
  virtual std::string id() const = 0;
};

class ByteTokenizer final : public Tokenizer {
 public:
  std::vector<int32_t> encode(const std::string& text) const override;
  std::string decode(const std::vector<int32_t>& tokens) const override;
  int64_t vocab_size() const override { return 256; }
  std::string id() const override { return "bytes"; }
};

// Byte-level BPE: text is cut into words (a word keeps its leading space), each word's bytes are
// merged pairwise by the learned merge list, lowest rank first. Training counts pairs over word
// frequencies and merges the most frequent pair (ties: the smallest pair of ids), so it is
// deterministic.
class BpeTokenizer final : public Tokenizer {
 public:
  // Learns vocab_size - 256 merges from `texts`.
  static Expected<BpeTokenizer> train(const std::vector<std::string>& texts, int64_t vocab_size);
  static Expected<BpeTokenizer> load(const std::string& path);
  Status save(const std::string& path) const;

  std::vector<int32_t> encode(const std::string& text) const override;
  std::string decode(const std::vector<int32_t>& tokens) const override;
  int64_t vocab_size() const override { return 256 + static_cast<int64_t>(merges_.size()); }
  std::string id() const override;
  const std::vector<std::pair<int32_t, int32_t>>& merges() const { return merges_; }

 private:
  explicit BpeTokenizer(std::vector<std::pair<int32_t, int32_t>> merges);
  std::vector<int32_t> encode_word(const std::string& word) const;

  std::vector<std::pair<int32_t, int32_t>> merges_;  // merge i makes token 256 + i
  std::map<std::pair<int32_t, int32_t>, int32_t> rank_;
  std::vector<std::string> pieces_;  // bytes of each token
};

// "bytes", a BPE file (hydra-data train-bpe) or a SentencePiece model (a name ending in .model).
Expected<std::unique_ptr<Tokenizer>> load_tokenizer(const std::string& spec);
// The id of the tokenizer `spec` names, without loading a SentencePiece model: "bytes",
// "bpe-<vocab>-<hash>", or "spm-<FNV-1a 64 of the model file's bytes>".
Expected<std::string> tokenizer_id(const std::string& spec);
// A SentencePiece model's name: ends in .model.
bool is_sentencepiece_model(const std::string& spec);

// Splits text into words: a run of letters/digits or a single other byte, each with the spaces
// before it.
std::vector<std::string> split_words(const std::string& text);

}  // namespace hydra::data
