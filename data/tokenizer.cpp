#include "data/tokenizer.h"

#include <cctype>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "data/sentencepiece.h"

namespace hydra::data {

std::vector<int32_t> ByteTokenizer::encode(const std::string& text) const {
  std::vector<int32_t> out(text.size());
  for (std::size_t i = 0; i < text.size(); ++i) out[i] = static_cast<unsigned char>(text[i]);
  return out;
}

std::string ByteTokenizer::decode(const std::vector<int32_t>& tokens) const {
  std::string s;
  for (int32_t t : tokens) s.push_back(static_cast<char>(t & 0xff));
  return s;
}

std::vector<std::string> split_words(const std::string& text) {
  std::vector<std::string> words;
  std::string cur;
  auto is_word = [](unsigned char c) { return std::isalnum(c) || c >= 0x80; };
  std::size_t i = 0;
  while (i < text.size()) {
    cur.clear();
    while (i < text.size() && text[i] == ' ') cur.push_back(text[i++]);
    if (i < text.size() && is_word(static_cast<unsigned char>(text[i]))) {
      while (i < text.size() && is_word(static_cast<unsigned char>(text[i])))
        cur.push_back(text[i++]);
    } else if (i < text.size()) {
      cur.push_back(text[i++]);
    }
    words.push_back(cur);
  }
  return words;
}

BpeTokenizer::BpeTokenizer(std::vector<std::pair<int32_t, int32_t>> merges)
    : merges_(std::move(merges)) {
  pieces_.resize(256);
  for (int i = 0; i < 256; ++i) pieces_[i] = std::string(1, static_cast<char>(i));
  for (std::size_t i = 0; i < merges_.size(); ++i) {
    rank_[merges_[i]] = static_cast<int32_t>(i);
    pieces_.push_back(pieces_[merges_[i].first] + pieces_[merges_[i].second]);
  }
}

Expected<BpeTokenizer> BpeTokenizer::train(const std::vector<std::string>& texts,
                                           int64_t vocab_size) {
  if (vocab_size < 256 || vocab_size > (int64_t{1} << 31))
    return invalid_argument("train-bpe: vocab size " + std::to_string(vocab_size) +
                            " must be >= 256");
  std::map<std::string, int64_t> freq;
  for (const std::string& t : texts)
    for (const std::string& w : split_words(t)) ++freq[w];
  std::vector<std::vector<int32_t>> words;
  std::vector<int64_t> counts;
  for (const auto& [w, c] : freq) {
    std::vector<int32_t> sym;
    for (unsigned char ch : w) sym.push_back(ch);
    words.push_back(std::move(sym));
    counts.push_back(c);
  }
  std::vector<std::pair<int32_t, int32_t>> merges;
  for (int64_t next = 256; next < vocab_size; ++next) {
    std::map<std::pair<int32_t, int32_t>, int64_t> pairs;
    for (std::size_t w = 0; w < words.size(); ++w)
      for (std::size_t i = 0; i + 1 < words[w].size(); ++i)
        pairs[{words[w][i], words[w][i + 1]}] += counts[w];
    if (pairs.empty()) break;
    auto best = pairs.begin();
    for (auto it = pairs.begin(); it != pairs.end(); ++it)
      if (it->second > best->second) best = it;  // std::map order breaks ties by the smaller pair
    if (best->second < 2) break;
    const auto [a, b] = best->first;
    merges.push_back({a, b});
    for (auto& sym : words) {
      std::vector<int32_t> out;
      for (std::size_t i = 0; i < sym.size(); ++i) {
        if (i + 1 < sym.size() && sym[i] == a && sym[i + 1] == b) {
          out.push_back(static_cast<int32_t>(next));
          ++i;
        } else {
          out.push_back(sym[i]);
        }
      }
      sym = std::move(out);
    }
  }
  return BpeTokenizer(std::move(merges));
}

std::vector<int32_t> BpeTokenizer::encode_word(const std::string& word) const {
  std::vector<int32_t> sym;
  for (unsigned char ch : word) sym.push_back(ch);
  while (sym.size() > 1) {
    int32_t best_rank = INT32_MAX;
    std::size_t at = 0;
    for (std::size_t i = 0; i + 1 < sym.size(); ++i) {
      auto it = rank_.find({sym[i], sym[i + 1]});
      if (it != rank_.end() && it->second < best_rank) {
        best_rank = it->second;
        at = i;
      }
    }
    if (best_rank == INT32_MAX) break;
    sym[at] = 256 + best_rank;
    sym.erase(sym.begin() + static_cast<std::ptrdiff_t>(at) + 1);
  }
  return sym;
}

std::vector<int32_t> BpeTokenizer::encode(const std::string& text) const {
  std::vector<int32_t> out;
  for (const std::string& w : split_words(text)) {
    const std::vector<int32_t> t = encode_word(w);
    out.insert(out.end(), t.begin(), t.end());
  }
  return out;
}

std::string BpeTokenizer::decode(const std::vector<int32_t>& tokens) const {
  std::string s;
  for (int32_t t : tokens)
    if (t >= 0 && t < static_cast<int32_t>(pieces_.size())) s += pieces_[t];
  return s;
}

std::string BpeTokenizer::id() const {
  uint64_t h = 1469598103934665603ull;  // FNV-1a over the merge list
  for (const auto& [a, b] : merges_)
    for (int32_t v : {a, b})
      for (int k = 0; k < 4; ++k) {
        h ^= (static_cast<uint32_t>(v) >> (8 * k)) & 0xff;
        h *= 1099511628211ull;
      }
  std::ostringstream os;
  os << "bpe-" << vocab_size() << "-" << std::hex << h;
  return os.str();
}

Status BpeTokenizer::save(const std::string& path) const {
  std::ofstream out(path);
  if (!out) return io_error(path + ": cannot write the tokenizer file");
  out << "hydra-bpe 1\n" << merges_.size() << "\n";
  for (const auto& [a, b] : merges_) out << a << " " << b << "\n";
  return out ? ok_status() : io_error(path + ": write failed");
}

Expected<BpeTokenizer> BpeTokenizer::load(const std::string& path) {
  std::ifstream in(path);
  if (!in) return not_found(path + ": cannot open the tokenizer file");
  std::string magic;
  int version = 0;
  int64_t n = -1;
  if (!(in >> magic >> version) || magic != "hydra-bpe" || version != 1)
    return data_loss(path +
                     ": not a Hydra BPE tokenizer file (expected the header 'hydra-bpe 1'; make "
                     "one with hydra-data train-bpe)");
  if (!(in >> n) || n < 0 || n > (int64_t{1} << 24))
    return data_loss(path + ": bad merge count on line 2");
  std::vector<std::pair<int32_t, int32_t>> merges;
  for (int64_t i = 0; i < n; ++i) {
    int64_t a = -1, b = -1;
    if (!(in >> a >> b))
      return data_loss(path + ": truncated: " + std::to_string(i) + " of " + std::to_string(n) +
                       " merges present");
    const int64_t limit = 256 + i;
    if (a < 0 || b < 0 || a >= limit || b >= limit)
      return data_loss(path + ": merge " + std::to_string(i) + " (line " + std::to_string(i + 3) +
                       ") refers to token " + std::to_string(std::max(a, b)) +
                       ", which does not exist yet");
    merges.push_back({static_cast<int32_t>(a), static_cast<int32_t>(b)});
  }
  return BpeTokenizer(std::move(merges));
}

bool is_sentencepiece_model(const std::string& spec) {
  return spec.size() > 6 && spec.compare(spec.size() - 6, 6, ".model") == 0;
}

Expected<std::string> tokenizer_id(const std::string& spec) {
  if (spec.empty() || spec == "bytes") return std::string("bytes");
  if (is_sentencepiece_model(spec)) {
    std::ifstream in(spec, std::ios::binary);
    if (!in) return not_found(spec + ": no such SentencePiece model file");
    uint64_t h = 1469598103934665603ULL;  // FNV-1a 64
    char buf[1 << 16];
    while (in.read(buf, sizeof buf) || in.gcount() > 0) {
      for (std::streamsize i = 0; i < in.gcount(); ++i) {
        h ^= static_cast<unsigned char>(buf[i]);
        h *= 1099511628211ULL;
      }
    }
    char hex[24];
    std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(h));
    return std::string("spm-") + hex;
  }
  HYDRA_ASSIGN_OR_RETURN(BpeTokenizer bpe, BpeTokenizer::load(spec));
  return bpe.id();
}

Expected<std::unique_ptr<Tokenizer>> load_tokenizer(const std::string& spec) {
  if (spec.empty() || spec == "bytes")
    return std::unique_ptr<Tokenizer>(std::make_unique<ByteTokenizer>());
  if (is_sentencepiece_model(spec)) {
    HYDRA_ASSIGN_OR_RETURN(auto spm, SentencePieceTokenizer::load(spec));
    return std::unique_ptr<Tokenizer>(std::move(spm));
  }
  auto bpe = BpeTokenizer::load(spec);
  if (!bpe.ok()) return bpe.status();
  return std::unique_ptr<Tokenizer>(std::make_unique<BpeTokenizer>(std::move(*bpe)));
}

}  // namespace hydra::data
