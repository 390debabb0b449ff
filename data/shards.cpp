#include "data/shards.h"

#include <algorithm>
#include <filesystem>

namespace hydra::data {

namespace fs = std::filesystem;

Status write_token_shard(const std::string& path, const std::vector<int32_t>& tokens,
                         const std::vector<int64_t>& doc_offsets, const std::string& tokenizer_id,
                         int64_t vocab_size) {
  const std::string tmp = path + ".tmp";
  {
    HYDRA_ASSIGN_OR_RETURN(Hdf5File f, Hdf5File::create(tmp));
    const int64_t n = static_cast<int64_t>(tokens.size());
    if (vocab_size <= 65536) {
      std::vector<uint16_t> t(tokens.begin(), tokens.end());
      HYDRA_RETURN_IF_ERROR(f.write("tokens", Hdf5Type::kU16, {n}, t.data()));
    } else {
      std::vector<uint32_t> t(tokens.begin(), tokens.end());
      HYDRA_RETURN_IF_ERROR(f.write("tokens", Hdf5Type::kU32, {n}, t.data()));
    }
    HYDRA_RETURN_IF_ERROR(f.write("doc_offsets", Hdf5Type::kI64,
                                  {static_cast<int64_t>(doc_offsets.size())}, doc_offsets.data()));
    HYDRA_RETURN_IF_ERROR(f.write_attr("format", std::string(kShardFormat)));
    HYDRA_RETURN_IF_ERROR(f.write_attr("tokenizer", tokenizer_id));
    HYDRA_RETURN_IF_ERROR(f.write_attr("vocab_size", vocab_size));
    HYDRA_RETURN_IF_ERROR(f.flush());
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) return io_error(path + ": cannot move the finished shard into place: " + ec.message());
  return ok_status();
}

Expected<TokenShard> TokenShard::open(const std::string& path) {
  HYDRA_ASSIGN_OR_RETURN(Hdf5File f, Hdf5File::open_read(path));
  TokenShard s;
  auto format = f.read_attr_string("format");
  if (!format.ok() || *format != kShardFormat)
    return data_loss(path + ": not a Hydra token shard (attribute format must be '" + kShardFormat +
                     "'; make shards with hydra-data tokenize)");
  HYDRA_ASSIGN_OR_RETURN(s.tokenizer_, f.read_attr_string("tokenizer"));
  HYDRA_ASSIGN_OR_RETURN(s.vocab_size_, f.read_attr_int("vocab_size"));
  HYDRA_ASSIGN_OR_RETURN(std::vector<int64_t> tshape, f.shape("tokens"));
  HYDRA_ASSIGN_OR_RETURN(std::vector<int64_t> dshape, f.shape("doc_offsets"));
  if (tshape.size() != 1 || dshape.size() != 1)
    return data_loss(path + ": datasets tokens and doc_offsets must be 1-D");
  HYDRA_ASSIGN_OR_RETURN(int64_t esize, f.element_size("tokens"));
  if (esize != 2 && esize != 4) return data_loss(path + ": tokens must be uint16 or uint32");
  s.num_tokens_ = tshape[0];
  s.num_docs_ = dshape[0];
  // A truncated file fails here rather than in the middle of training.
  if (s.num_tokens_ > 0) {
    int32_t last = 0;
    HYDRA_RETURN_IF_ERROR(f.read_range("tokens", Hdf5Type::kI32, s.num_tokens_ - 1, 1, &last));
  }
  s.file_ = std::make_shared<Hdf5File>(std::move(f));
  return s;
}

Status TokenShard::read(int64_t offset, int64_t count, int32_t* out) const {
  if (offset < 0 || offset + count > num_tokens_)
    return out_of_range(path() + ": read [" + std::to_string(offset) + ", " +
                        std::to_string(offset + count) + ") past the " +
                        std::to_string(num_tokens_) + " tokens");
  HYDRA_RETURN_IF_ERROR(file_->read_range("tokens", Hdf5Type::kI32, offset, count, out));
  for (int64_t i = 0; i < count; ++i)
    if (out[i] < 0 || out[i] >= vocab_size_)
      return data_loss(path() + ": token " + std::to_string(out[i]) + " at position " +
                       std::to_string(offset + i) + " is outside the shard's vocabulary of " +
                       std::to_string(vocab_size_));
  return ok_status();
}

Expected<std::vector<std::string>> expand_shard_paths(const std::vector<std::string>& entries) {
  std::vector<std::string> out;
  for (const std::string& e : entries) {
    std::error_code ec;
    if (fs::is_directory(e, ec)) {
      std::vector<std::string> files;
      for (const auto& de : fs::directory_iterator(e))
        if (de.is_regular_file() && de.path().extension() == ".h5")
          files.push_back(de.path().string());
      std::sort(files.begin(), files.end());
      if (files.empty()) return not_found(e + ": folder holds no .h5 token shards");
      out.insert(out.end(), files.begin(), files.end());
    } else if (fs::exists(e, ec)) {
      out.push_back(e);
    } else {
      return not_found(e + ": no such token shard or folder (data.shards)");
    }
  }
  return out;
}

}  // namespace hydra::data
