// Status and Expected<T>: errors a user can cause (configs, flags, files, world sizes) travel up to
// main() as values and are printed there as one line.
#pragma once

#include <optional>
#include <string>
#include <utility>

#include "base/check.h"

namespace hydra {

enum class StatusCode {
  kOk,
  kInvalidArgument,
  kNotFound,
  kIoError,
  kDataLoss,
  kFailedPrecondition,
  kAlreadyExists,
  kOutOfRange,
  kInternal,
  kUnimplemented
};

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }
  // Adds context in front: "reading run/ckpt-20/manifest.pb: " + message.
  Status with_context(const std::string& context) const {
    return ok() ? *this : Status(code_, context + ": " + message_);
  }

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

inline Status ok_status() { return {}; }
inline Status invalid_argument(std::string m) {
  return {StatusCode::kInvalidArgument, std::move(m)};
}
inline Status not_found(std::string m) { return {StatusCode::kNotFound, std::move(m)}; }
inline Status io_error(std::string m) { return {StatusCode::kIoError, std::move(m)}; }
inline Status data_loss(std::string m) { return {StatusCode::kDataLoss, std::move(m)}; }
inline Status failed_precondition(std::string m) {
  return {StatusCode::kFailedPrecondition, std::move(m)};
}
inline Status already_exists(std::string m) { return {StatusCode::kAlreadyExists, std::move(m)}; }
inline Status out_of_range(std::string m) { return {StatusCode::kOutOfRange, std::move(m)}; }
inline Status internal_error(std::string m) { return {StatusCode::kInternal, std::move(m)}; }
inline Status unimplemented(std::string m) { return {StatusCode::kUnimplemented, std::move(m)}; }

template <class T>
class [[nodiscard]] Expected {
 public:
  Expected(T value) : value_(std::move(value)) {}         // NOLINT: implicit by design
  Expected(Status status) : status_(std::move(status)) {  // NOLINT
    HYDRA_CHECK(!status_.ok()) << "Expected<T> built from an OK status";
  }

  bool ok() const { return value_.has_value(); }
  const Status& status() const { return status_; }
  T& value() & {
    HYDRA_CHECK(ok()) << status_.message();
    return *value_;
  }
  const T& value() const& {
    HYDRA_CHECK(ok()) << status_.message();
    return *value_;
  }
  T&& value() && {
    HYDRA_CHECK(ok()) << status_.message();
    return std::move(*value_);
  }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

 private:
  Status status_;
  std::optional<T> value_;
};

}  // namespace hydra

#define HYDRA_CONCAT_INNER(a, b) a##b
#define HYDRA_CONCAT(a, b) HYDRA_CONCAT_INNER(a, b)

#define HYDRA_RETURN_IF_ERROR(expr)                \
  do {                                             \
    ::hydra::Status hydra_status_ = (expr);        \
    if (!hydra_status_.ok()) return hydra_status_; \
  } while (0)

#define HYDRA_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                                \
  if (!tmp.ok()) return tmp.status();               \
  lhs = std::move(tmp).value()

#define HYDRA_ASSIGN_OR_RETURN(lhs, expr) \
  HYDRA_ASSIGN_OR_RETURN_IMPL(HYDRA_CONCAT(hydra_expected_, __LINE__), lhs, expr)
