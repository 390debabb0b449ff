// Invariant checks. HYDRA_CHECK(cond) << "context" throws hydra::Error with file:line and the
// context; uncaught, it ends the program with that message (main() prints it and exits non-zero).
// Used for programmer errors and for shape/dtype mismatches inside ops, which name the op and the
// shapes.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace hydra {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

class CheckFailure {
 public:
  CheckFailure(const char* file, int line, const char* condition) {
    stream_ << file << ":" << line << ": ";
    if (condition != nullptr) stream_ << "check failed: " << condition << ": ";
  }
  CheckFailure(const CheckFailure&) = delete;
  CheckFailure& operator=(const CheckFailure&) = delete;
  template <class T>
  CheckFailure& operator<<(const T& value) {
    stream_ << value;
    return *this;
  }
  [[noreturn]] ~CheckFailure() noexcept(false) { throw Error(stream_.str()); }

 private:
  std::ostringstream stream_;
};

}  // namespace detail
}  // namespace hydra

// A loop rather than if/else so that `if (x) HYDRA_CHECK(y) << ...; else ...` parses as written;
// the body throws, so it runs at most once.
#define HYDRA_CHECK(cond) \
  while (!(cond)) ::hydra::detail::CheckFailure(__FILE__, __LINE__, #cond)

#define HYDRA_FAIL() ::hydra::detail::CheckFailure(__FILE__, __LINE__, nullptr)
