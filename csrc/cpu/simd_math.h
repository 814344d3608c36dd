// Explicit SIMD for the CPU kernel with GCC vector extensions: one float vector type of the width the
// build targets (AVX-512: 16 lanes, AVX2: 8, else 4). GCC's auto-vectoriser kept the exp/log-heavy loops
// scalar at run time (measured: 15x slower for JSD), so the math is written once as templates that
// compile both for the vector type (main loop) and for plain float (the row's tail).
// No torch headers: this file compiles with plain g++.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace kdfast_cpu {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX2__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif

typedef float VFloat __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t VInt __attribute__((vector_size(kLanes * sizeof(int32_t))));

// Scalar/vector twins of the few operations whose spelling differs.
inline int32_t round_to_int(float x) { return static_cast<int32_t>(x); }
inline VInt round_to_int(VFloat x) { return __builtin_convertvector(x, VInt); }
inline float int_to_float(int32_t x) { return static_cast<float>(x); }
inline VFloat int_to_float(VInt x) { return __builtin_convertvector(x, VFloat); }
inline float bits_as_float(int32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}
inline VFloat bits_as_float(VInt bits) { return __builtin_bit_cast(VFloat, bits); }
inline int32_t float_as_bits(float value) {
  int32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}
inline VInt float_as_bits(VFloat value) { return __builtin_bit_cast(VInt, value); }
template <typename F> inline F splat(float value) { return F{} + value; }

template <typename F> inline F load(const float* p);
template <> inline float load<float>(const float* p) { return *p; }
template <> inline VFloat load<VFloat>(const float* p) {
  VFloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store(float* p, float v) { *p = v; }
inline void store(float* p, VFloat v) { std::memcpy(p, &v, sizeof(v)); }

inline float horizontal_sum(float x) { return x; }
inline float horizontal_sum(VFloat x) {
  float total = 0.0f;
  for (int lane = 0; lane < kLanes; ++lane) total += x[lane];
  return total;
}
inline float horizontal_max(VFloat x) {
  float best = x[0];
  for (int lane = 1; lane < kLanes; ++lane) best = x[lane] > best ? x[lane] : best;
  return best;
}

inline bool any_lane(VInt mask) {
  for (int lane = 0; lane < kLanes; ++lane) {
    if (mask[lane]) return true;
  }
  return false;
}

// max over a row of x * scale (-inf for an empty row), vectorised.
inline float row_max_scaled(const float* x, int64_t width, float scale) {
  const int64_t vector_end = width - width % kLanes;
  VFloat top_lanes = splat<VFloat>(-INFINITY);
  for (int64_t j = 0; j < vector_end; j += kLanes) {
    const VFloat v = load<VFloat>(x + j) * scale;
    top_lanes = v > top_lanes ? v : top_lanes;
  }
  float top = vector_end > 0 ? horizontal_max(top_lanes) : -INFINITY;
  for (int64_t j = vector_end; j < width; ++j) top = x[j] * scale > top ? x[j] * scale : top;
  return top;
}

// The first j with x[j] * scale == value, or -1. The scalar loop (an early exit, which GCC does not vectorise) took a
// row's argmax at about a column a cycle, half a row on average; here a block of vectors is compared, its hits OR-ed
// lane by lane and looked at once, and only the block that holds one is searched column by column.
inline int64_t first_index_scaled(const float* x, int64_t width, float scale, float value) {
  constexpr int64_t kBlock = 16 * kLanes;
  int64_t j = 0;
  for (; j + kBlock <= width; j += kBlock) {
    VInt hits{};
    for (int64_t k = j; k < j + kBlock; k += kLanes) hits |= load<VFloat>(x + k) * scale == value;
    if (any_lane(hits)) break;
  }
  for (; j < width; ++j) {
    if (x[j] * scale == value) return j;
  }
  return -1;
}

// exp(x) = 2^n * exp(r), |r| <= ln2/2: returns exp(r) by a degree-6 polynomial, and n (a float holding an integer).
template <typename F>
inline F exp_reduced(F x, F* n_out) {
  // Round to nearest by the 1.5 * 2^23 trick: branch-free and identical for scalar and vector.
  const F n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  F r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  F poly = splat<F>(1.9875691500e-4f);
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  *n_out = n;
  return poly * r * r + r + 1.0f;
}

// exp(x) for x in [-87.3365, 88], about 2 ulp: 2^n is built from its bits (n + 127 must be a normal exponent).
template <typename F>
inline F exp_in_range(F x) {
  F n;
  const F poly = exp_reduced(x, &n);
  return poly * bits_as_float((round_to_int(n) + 127) << 23);
}

// exp(x) with about 2 ulp error for x <= 88. The kernel calls it on centred logits (x <= 0). exp(x < -87.3) = 0 (no
// denormals, so also exp(-inf) = 0), NaN stays NaN.
template <typename F>
inline F fast_exp(F x) {
  const F clamped = x > 88.0f ? splat<F>(88.0f) : (x < -87.3365f ? splat<F>(-87.3365f) : x);
  F result = exp_in_range(clamped);
  result = x < -87.3365f ? splat<F>(0.0f) : result;
  // NaN needs no select: every comparison above is false for it, and the polynomial carries it through.
  return x > 88.7228f ? splat<F>(INFINITY) : result;
}

// fast_exp for x <= 0 or NaN (logits centred on their row's max, or log-probabilities) without the overflow clamps:
// a fifth fewer instructions in the passes that take one exp per element, and fast_exp's values for every x <= 88.
// (The generic form keeps its own name: tests/test_simd_math.py holds the AVX-512 form below to it.)
template <typename F>
inline F fast_exp_centred_generic(F x) {
  const F result = exp_in_range(x < -87.3365f ? splat<F>(-87.3365f) : x);
  return x < -87.3365f ? splat<F>(0.0f) : result;
}
template <typename F>
inline F fast_exp_centred(F x) {
  return fast_exp_centred_generic(x);
}

#if defined(__AVX512F__)
// The same values with AVX-512's vscalefps, poly * 2^n in one instruction for any n: no clamp of x before the
// polynomial, no exponent bits built, and x < -87.3365 zeroed by the instruction's mask (-inf there makes the
// polynomial NaN, which the mask drops; a NaN x keeps its lane and stays NaN). Six instructions of about twenty fewer
// an exp (measured alone on a Zen 5: 1.67 ns against 2.37 a vector of 16); the values are the generic form's, bit for
// bit, since scaling by 2^n is exact wherever that form's product is.
template <>
inline VFloat fast_exp_centred<VFloat>(VFloat x) {
  VFloat n;
  const VFloat poly = exp_reduced(x, &n);
  const __m512 v = reinterpret_cast<__m512>(x);
  const __mmask16 kept = _mm512_cmp_ps_mask(v, _mm512_set1_ps(-87.3365f), _CMP_NLT_UQ);  // x >= -87.3365 or NaN
  return reinterpret_cast<VFloat>(
      _mm512_maskz_scalef_ps(kept, reinterpret_cast<__m512>(poly), reinterpret_cast<__m512>(n)));
}
#endif

// log(x) for x in [1, 2^126) (uld_rows.cpp's -log(1 / x), the mixture's log of a sum), about 2 ulp:
// x = 2^e * m, m in [sqrt(1/2), sqrt(2)), log(m) by a series in f = (m - 1) / (m + 1). Always inlined: GCC once
// called it out of line (through the PLT) in the mixture's log pass, a quarter of that kernel's samples.
template <typename F>
inline __attribute__((always_inline)) F log_of_parts(F x, F mantissa, F exponent) {
  const F f = (mantissa - 1.0f) / (mantissa + 1.0f);
  const F f2 = f * f;
  F series = splat<F>(0.1420889f);
  series = series * f2 + 0.1531383769f;
  series = series * f2 + 0.1818357216f;
  series = series * f2 + 0.2222219843f;
  series = series * f2 + 0.2857142874f;
  series = series * f2 + 0.3999999999f;
  series = series * f2 + 0.6666666667f;
  const F result = exponent * 0.693147180559945f + f * (2.0f + f2 * series);
  return x != x ? x : result;
}

template <typename F>
inline __attribute__((always_inline)) F fast_log_ge1_generic(F x) {
  const auto bits = float_as_bits(x);
  auto exponent = ((bits >> 23) & 0xff) - 127;
  F mantissa = bits_as_float((bits & 0x007fffff) | 0x3f800000);
  const auto upper = mantissa > 1.41421356f;
  mantissa = upper ? mantissa * 0.5f : mantissa;
  exponent = upper ? exponent + 1 : exponent;
  return log_of_parts(x, mantissa, int_to_float(exponent));
}
template <typename F>
inline __attribute__((always_inline)) F fast_log_ge1(F x) {
  return fast_log_ge1_generic(x);
}

#if defined(__AVX512F__)
// The same values (for the positive normal x every caller passes: checked bit for bit over all of them) with
// AVX-512's vgetmantps and vgetexpps, which take m in [1, 2) and e as a float in one instruction each, where the
// generic form shifts, masks and converts the bits.
template <>
inline __attribute__((always_inline)) VFloat fast_log_ge1<VFloat>(VFloat x) {
  const __m512 v = reinterpret_cast<__m512>(x);
  __m512 mantissa = _mm512_getmant_ps(v, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src);
  __m512 exponent = _mm512_getexp_ps(v);
  const __mmask16 upper = _mm512_cmp_ps_mask(mantissa, _mm512_set1_ps(1.41421356f), _CMP_GT_OQ);
  mantissa = _mm512_mask_mul_ps(mantissa, upper, mantissa, _mm512_set1_ps(0.5f));
  exponent = _mm512_mask_add_ps(exponent, upper, exponent, _mm512_set1_ps(1.0f));
  return log_of_parts(x, reinterpret_cast<VFloat>(mantissa), reinterpret_cast<VFloat>(exponent));
}
#endif

// log(1 + e) for e in [0, 1], a log-sum-exp's correction term, within 3 ulp of the result however small e is:
// 2 atanh(f) with f = e / (2 + e) <= 1/3, its series to f^15 (the rest below 2e-9 of it). log(1 + e) taken as
// the log of the rounded sum 1 + e drops every bit of e below 2^-24, and a divergence that is a difference of
// such terms (JSD at beta near 0 or 1) lost its digits: 1% of its gradient at beta = 1e-6, 13% at 1e-8.
template <typename F>
inline __attribute__((always_inline)) F log1p_unit(F e) {
  const F f = e / (2.0f + e);
  const F f2 = f * f;
  F series = splat<F>(1.0f / 15.0f);
  series = series * f2 + 1.0f / 13.0f;
  series = series * f2 + 1.0f / 11.0f;
  series = series * f2 + 1.0f / 9.0f;
  series = series * f2 + 1.0f / 7.0f;
  series = series * f2 + 1.0f / 5.0f;
  series = series * f2 + 1.0f / 3.0f;
  return (f + f) * (1.0f + f2 * series);
}

// log(exp(a) + exp(b)) without forming the sum: a mixture's log-probability (docs/DESIGN.md, numerics).
template <typename F>
inline F log_add_exp(F a, F b) {
  const F hi = a > b ? a : b;
  const F lo = a > b ? b : a;
  const F result = hi + log1p_unit(fast_exp(lo - hi));
  return hi == -INFINITY ? hi : result;  // both -inf: -inf, not NaN
}

// 16-bit storage types, converted through float.
struct BFloat16 {
  uint16_t bits;
};
struct Float16 {
  uint16_t bits;
};

inline float to_float(float value) { return value; }
inline float to_float(BFloat16 value) { return bits_as_float(static_cast<int32_t>(value.bits) << 16); }
inline float to_float(Float16 value) {
  _Float16 half;
  std::memcpy(&half, &value.bits, sizeof(half));
  return static_cast<float>(half);
}

inline void from_float(float value, float* out) { *out = value; }
inline void from_float(float value, BFloat16* out) {
  const uint32_t bits = static_cast<uint32_t>(float_as_bits(value));
  // Round to nearest even, as torch does; NaN stays a quiet NaN.
  const uint16_t rounded = static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
  out->bits = value != value ? static_cast<uint16_t>(0x7fc0) : rounded;
}
inline void from_float(float value, Float16* out) {
  const _Float16 half = static_cast<_Float16>(value);
  std::memcpy(&out->bits, &half, sizeof(half));
}

// Stores a block of computed gradient values (scalar or vector) into the gradient's storage type.
template <typename GradT>
inline void store_grad(GradT* out, float value) { from_float(value, out); }
template <typename GradT>
inline void store_grad(GradT* out, VFloat value) {
  for (int lane = 0; lane < kLanes; ++lane) from_float(value[lane], &out[lane]);
}
inline void store_grad(float* out, VFloat value) { store(out, value); }

}  // namespace kdfast_cpu
