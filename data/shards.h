// Token shards: one HDF5 file per shard holding
//   tokens       1-D uint16 (vocab <= 65536) or uint32: the concatenated documents
//   doc_offsets  1-D int64: where each document starts
//   attributes   format = "hydra-tokens-1", tokenizer (its id), vocab_size
// written by `hydra-data tokenize`, read by the loader a window at a time.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "data/hdf5_file.h"

namespace hydra::data {

inline constexpr const char* kShardFormat = "hydra-tokens-1";

// Writes to `path` + ".tmp" and renames into place.
Status write_token_shard(const std::string& path, const std::vector<int32_t>& tokens,
                         const std::vector<int64_t>& doc_offsets, const std::string& tokenizer_id,
                         int64_t vocab_size);

class TokenShard {
 public:
  static Expected<TokenShard> open(const std::string& path);
  const std::string& path() const { return file_->path(); }
  int64_t num_tokens() const { return num_tokens_; }
  int64_t num_docs() const { return num_docs_; }
  int64_t vocab_size() const { return vocab_size_; }
  const std::string& tokenizer() const { return tokenizer_; }
  // Tokens [offset, offset + count); each checked against the vocabulary (errors name shard and
  // position).
  Status read(int64_t offset, int64_t count, int32_t* out) const;

 private:
  std::shared_ptr<Hdf5File> file_;
  int64_t num_tokens_ = 0, num_docs_ = 0, vocab_size_ = 0;
  std::string tokenizer_;
};

// Files as given; folders contribute their *.h5 files in name order. Errors name a missing entry.
Expected<std::vector<std::string>> expand_shard_paths(const std::vector<std::string>& entries);

}  // namespace hydra::data
