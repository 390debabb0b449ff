#include "data/sentencepiece.h"

#include <dlfcn.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <sstream>

namespace hydra::data {
namespace {

namespace fs = std::filesystem;

constexpr const char* kShim = "libhydra_sentencepiece.so";

// The shim's functions (data/sentencepiece_shim.cpp).
struct Shim {
  void* (*load)(const char*, char*, int64_t) = nullptr;
  void (*free)(void*) = nullptr;
  int64_t (*vocab)(void*) = nullptr;
  int64_t (*encode)(void*, const char*, int64_t, int32_t*, int64_t) = nullptr;
  int64_t (*decode)(void*, const int32_t*, int64_t, char*, int64_t) = nullptr;
  int (*train)(const char*, char*, int64_t) = nullptr;
};

// Where the shim may be: $HYDRA_SENTENCEPIECE_LIB, beside the executable, in ../bin from it (tests
// run from build/tests), and where this build put it.
std::vector<std::string> shim_candidates() {
  std::vector<std::string> out;
  if (const char* env = std::getenv("HYDRA_SENTENCEPIECE_LIB"); env != nullptr && *env != '\0')
    out.emplace_back(env);
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    out.push_back((exe.parent_path() / kShim).string());
    out.push_back((exe.parent_path().parent_path() / "bin" / kShim).string());
  }
#ifdef HYDRA_SENTENCEPIECE_SHIM
  out.emplace_back(HYDRA_SENTENCEPIECE_SHIM);
#endif
  return out;
}

Expected<const Shim*> shim() {
  static std::once_flag once;
  static Shim s;
  static std::string error;
  std::call_once(once, [] {
    std::string tried;
    for (const std::string& path : shim_candidates()) {
      if (!fs::exists(path)) {
        tried += (tried.empty() ? "" : ", ") + path;
        continue;
      }
      // Its own symbols first (RTLD_DEEPBIND): see data/sentencepiece_shim.cpp.
#if defined(HYDRA_SANITIZE)
      error =
          "SentencePiece is not available in a sanitizer build: its library must be opened "
          "with RTLD_DEEPBIND, which AddressSanitizer refuses";
      return;
#endif
      void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
      if (h == nullptr) {
        error = std::string("cannot open ") + path + ": " + dlerror() +
                " (is libsentencepiece0 installed? apt-get install libsentencepiece-dev)";
        return;
      }
      s.load = reinterpret_cast<decltype(s.load)>(dlsym(h, "hydra_spm_load"));
      s.free = reinterpret_cast<decltype(s.free)>(dlsym(h, "hydra_spm_free"));
      s.vocab = reinterpret_cast<decltype(s.vocab)>(dlsym(h, "hydra_spm_vocab"));
      s.encode = reinterpret_cast<decltype(s.encode)>(dlsym(h, "hydra_spm_encode"));
      s.decode = reinterpret_cast<decltype(s.decode)>(dlsym(h, "hydra_spm_decode"));
      s.train = reinterpret_cast<decltype(s.train)>(dlsym(h, "hydra_spm_train"));
      if (!s.load || !s.free || !s.vocab || !s.encode || !s.decode || !s.train)
        error = path + " is not Hydra's SentencePiece shim (a function is missing)";
      return;
    }
    error = std::string("SentencePiece support: ") + kShim + " not found (looked at " + tried +
            "); build Hydra with libsentencepiece-dev installed, or set HYDRA_SENTENCEPIECE_LIB";
  });
  if (!error.empty()) return failed_precondition(error);
  return &s;
}

}  // namespace

Expected<std::unique_ptr<SentencePieceTokenizer>> SentencePieceTokenizer::load(
    const std::string& path) {
  if (!fs::is_regular_file(path)) return not_found(path + ": no such SentencePiece model file");
  HYDRA_ASSIGN_OR_RETURN(const Shim* s, shim());
  char err[512] = {};
  void* model = s->load(path.c_str(), err, sizeof err);
  if (model == nullptr)
    return data_loss(path + ": not a SentencePiece model (" + std::string(err) + ")");
  HYDRA_ASSIGN_OR_RETURN(std::string id, tokenizer_id(path));
  return std::unique_ptr<SentencePieceTokenizer>(
      new SentencePieceTokenizer(model, s->vocab(model), std::move(id)));
}

Status SentencePieceTokenizer::train(const std::vector<std::string>& inputs, int64_t vocab_size,
                                     const std::string& out) {
  if (out.size() < 7 || out.substr(out.size() - 6) != ".model")
    return invalid_argument("--out " + out + ": a SentencePiece model's name ends in .model");
  HYDRA_ASSIGN_OR_RETURN(const Shim* s, shim());
  std::ostringstream args;
  args << "--input=";
  for (std::size_t i = 0; i < inputs.size(); ++i) args << (i ? "," : "") << inputs[i];
  args << " --model_prefix=" << out.substr(0, out.size() - 6) << " --vocab_size=" << vocab_size
       << " --minloglevel=3";
  char err[1024] = {};
  if (s->train(args.str().c_str(), err, sizeof err) != 0)
    return invalid_argument(std::string("SentencePiece training failed: ") + err);
  return ok_status();
}

SentencePieceTokenizer::~SentencePieceTokenizer() {
  if (auto s = shim(); s.ok()) (*s)->free(model_);
}

std::vector<int32_t> SentencePieceTokenizer::encode(const std::string& text) const {
  const Shim* s = *shim();  // loaded: this object exists
  std::vector<int32_t> ids(text.size() + 16);
  int64_t n = s->encode(model_, text.data(), static_cast<int64_t>(text.size()), ids.data(),
                        static_cast<int64_t>(ids.size()));
  HYDRA_CHECK(n >= 0) << "SentencePiece could not encode a text of " << text.size() << " bytes";
  if (n > static_cast<int64_t>(ids.size())) {
    ids.resize(static_cast<std::size_t>(n));
    n = s->encode(model_, text.data(), static_cast<int64_t>(text.size()), ids.data(), n);
  }
  ids.resize(static_cast<std::size_t>(n));
  return ids;
}

std::string SentencePieceTokenizer::decode(const std::vector<int32_t>& tokens) const {
  const Shim* s = *shim();
  std::string text(tokens.size() * 8 + 16, '\0');
  int64_t n = s->decode(model_, tokens.data(), static_cast<int64_t>(tokens.size()), text.data(),
                        static_cast<int64_t>(text.size()));
  HYDRA_CHECK(n >= 0) << "SentencePiece: a token id outside the vocabulary of " << vocab_;
  if (n > static_cast<int64_t>(text.size())) {
    text.resize(static_cast<std::size_t>(n));
    n = s->decode(model_, tokens.data(), static_cast<int64_t>(tokens.size()), text.data(), n);
  }
  text.resize(static_cast<std::size_t>(n));
  return text;
}

}  // namespace hydra::data
