// Element types shared by every module, and bfloat16 as a plain 16-bit struct usable on host and
// device.
#pragma once

#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>

#if defined(__CUDACC__)
#define HYDRA_HD __host__ __device__ __forceinline__
#else
#define HYDRA_HD inline
#endif

namespace hydra {

enum class DType : uint8_t { kF32, kF64, kBF16, kI32, kI64 };

// bfloat16: the upper half of an IEEE float; conversion rounds to nearest even.
struct bf16 {
  uint16_t bits = 0;

  bf16() = default;
  HYDRA_HD explicit bf16(float f) : bits(from_float(f)) {}
  HYDRA_HD explicit operator float() const { return to_float(bits); }

  HYDRA_HD static uint16_t from_float(float f) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    // One instruction (F2FP) instead of the eight below; the same rounding, a canonical NaN
    // (0x7fff).
    uint16_t r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
#else
    uint32_t u = float_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u)
      return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
#endif
  }
  HYDRA_HD static float to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }
  HYDRA_HD static uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(f);
#else
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
#endif
  }
  HYDRA_HD static float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(u);
#else
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
#endif
  }
};

constexpr int64_t dtype_size(DType t) {
  switch (t) {
    case DType::kF32:
      return 4;
    case DType::kF64:
      return 8;
    case DType::kBF16:
      return 2;
    case DType::kI32:
      return 4;
    case DType::kI64:
      return 8;
  }
  return 0;
}

constexpr std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::kF32:
      return "f32";
    case DType::kF64:
      return "f64";
    case DType::kBF16:
      return "bf16";
    case DType::kI32:
      return "i32";
    case DType::kI64:
      return "i64";
  }
  return "?";
}

// The dtype dtype_name() calls `name`, or none.
constexpr std::optional<DType> dtype_from_name(std::string_view name) {
  for (DType t : {DType::kF32, DType::kF64, DType::kBF16, DType::kI32, DType::kI64})
    if (dtype_name(t) == name) return t;
  return std::nullopt;
}

constexpr bool is_floating(DType t) {
  return t == DType::kF32 || t == DType::kF64 || t == DType::kBF16;
}
constexpr bool is_integral(DType t) { return t == DType::kI32 || t == DType::kI64; }

// The type reductions and saved statistics use: f64 for f64 tensors, f32 otherwise.
constexpr DType accumulate_dtype(DType t) { return t == DType::kF64 ? DType::kF64 : DType::kF32; }

template <class T>
struct DTypeOf;
template <>
struct DTypeOf<float> {
  static constexpr DType value = DType::kF32;
};
template <>
struct DTypeOf<double> {
  static constexpr DType value = DType::kF64;
};
template <>
struct DTypeOf<bf16> {
  static constexpr DType value = DType::kBF16;
};
template <>
struct DTypeOf<int32_t> {
  static constexpr DType value = DType::kI32;
};
template <>
struct DTypeOf<int64_t> {
  static constexpr DType value = DType::kI64;
};
template <class T>
inline constexpr DType dtype_of = DTypeOf<T>::value;

}  // namespace hydra
