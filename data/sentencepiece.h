// SentencePiece models (the `.model` files many corpora come with) as a Tokenizer, through Debian's
// libsentencepiece behind data/sentencepiece_shim.cpp (see there why it is opened at run time).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "data/tokenizer.h"

namespace hydra::data {

class SentencePieceTokenizer final : public Tokenizer {
 public:
  // Errors name the file: missing, not a SentencePiece model, or the library not found.
  static Expected<std::unique_ptr<SentencePieceTokenizer>> load(const std::string& path);
  // Learns a model of `vocab_size` pieces from the text files `inputs` (SentencePiece's unigram
  // model, its defaults otherwise), written to `out` (a name ending in .model).
  static Status train(const std::vector<std::string>& inputs, int64_t vocab_size,
                      const std::string& out);
  ~SentencePieceTokenizer() override;
  SentencePieceTokenizer(const SentencePieceTokenizer&) = delete;
  SentencePieceTokenizer& operator=(const SentencePieceTokenizer&) = delete;

  std::vector<int32_t> encode(const std::string& text) const override;
  std::string decode(const std::vector<int32_t>& tokens) const override;
  int64_t vocab_size() const override { return vocab_; }
  std::string id() const override { return id_; }

 private:
  SentencePieceTokenizer(void* model, int64_t vocab, std::string id)
      : model_(model), vocab_(vocab), id_(std::move(id)) {}
  void* model_;
  int64_t vocab_;
  std::string id_;
};

}  // namespace hydra::data
