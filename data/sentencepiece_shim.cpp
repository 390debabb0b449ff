// The SentencePiece library behind a C interface, built as its own shared object
// (libhydra_sentencepiece.so) and opened with dlopen(RTLD_LOCAL | RTLD_DEEPBIND) by
// data/sentencepiece.cpp. Debian's libsentencepiece carries its own copy of protobuf (3.14) whose
// symbols have the same names as the system libprotobuf the configs use (3.21): linked into one
// program the two collide and it aborts at start-up. Opened this way the library binds to its own
// copy. Nothing of SentencePiece crosses this boundary but ints, bytes and a handle.
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

// Exported by libsentencepiece, declared in a header Debian does not install.
namespace sentencepiece::logging {
void SetMinLogLevel(int v);
}  // namespace sentencepiece::logging

namespace {

// The library logs to std::cerr. Bound to its own symbols, it would write to libstdc++'s std::cerr,
// which the executable's copy (a copy relocation) left unconstructed: only fatal messages, and
// those end the process anyway. Its errors reach the caller as statuses instead.
void quiet() { sentencepiece::logging::SetMinLogLevel(3); }

void set_error(const std::string& message, char* err, int64_t cap) {
  if (err == nullptr || cap <= 0) return;
  const std::size_t n = std::min<std::size_t>(message.size(), static_cast<std::size_t>(cap - 1));
  std::memcpy(err, message.data(), n);
  err[n] = '\0';
}

}  // namespace

extern "C" {

// A loaded model, or null with the reason in err.
void* hydra_spm_load(const char* path, char* err, int64_t cap) {
  quiet();
  auto* p = new sentencepiece::SentencePieceProcessor();
  const auto st = p->Load(path);
  if (!st.ok()) {
    set_error(st.ToString(), err, cap);
    delete p;
    return nullptr;
  }
  return p;
}

void hydra_spm_free(void* model) {
  delete static_cast<sentencepiece::SentencePieceProcessor*>(model);
}

int64_t hydra_spm_vocab(void* model) {
  return static_cast<sentencepiece::SentencePieceProcessor*>(model)->GetPieceSize();
}

// The ids of text[0, n): their count; the first min(count, cap) are written to out. -1 on error.
int64_t hydra_spm_encode(void* model, const char* text, int64_t n, int32_t* out, int64_t cap) {
  std::vector<int> ids;
  if (!static_cast<sentencepiece::SentencePieceProcessor*>(model)
           ->Encode(std::string(text, static_cast<std::size_t>(n)), &ids)
           .ok())
    return -1;
  for (std::size_t i = 0; i < ids.size() && static_cast<int64_t>(i) < cap; ++i) out[i] = ids[i];
  return static_cast<int64_t>(ids.size());
}

// The text of ids[0, n): its length; the first min(length, cap) bytes are written to out. -1 on
// error (an id out of range).
int64_t hydra_spm_decode(void* model, const int32_t* ids, int64_t n, char* out, int64_t cap) {
  auto* p = static_cast<sentencepiece::SentencePieceProcessor*>(model);
  std::vector<int> v(ids, ids + n);
  for (const int id : v)
    if (id < 0 || id >= p->GetPieceSize()) return -1;
  std::string text;
  if (!p->Decode(v, &text).ok()) return -1;
  std::copy_n(text.data(), std::min<std::size_t>(text.size(), static_cast<std::size_t>(cap)), out);
  return static_cast<int64_t>(text.size());
}

// SentencePieceTrainer::Train with its flag string ("--input=... --model_prefix=... ..."): 0, or
// -1 with the reason in err.
int hydra_spm_train(const char* args, char* err, int64_t cap) {
  quiet();
  const auto st = sentencepiece::SentencePieceTrainer::Train(args);
  if (st.ok()) return 0;
  set_error(st.ToString(), err, cap);
  return -1;
}

}  // extern "C"
