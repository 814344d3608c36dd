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
// the exp of the kernels' passes that take one or more an element. (The generic form keeps its own name: the row's
// tail takes it, and tests/test_simd_math.py holds the AVX-512 form below to it bit for bit.)
#if defined(__AVX512F__)
// With AVX-512: exp(x) = 2^(k / 16) exp(r), k = round(16 x / ln 2), |r| <= ln 2 / 32: 2^((k mod 16) / 16) from a
// table of 16 (one vpermps from a register in the vector form) with floor(k / 16) added to its exponent bits, times
// exp(r) by a cubic in one multiply-add. Against exp_reduced's degree-7 polynomial and vscalefps that is four fewer
// multiply-class instructions an exp (the forward KL pass's loop: 22 against 30), on the ports these passes wait on:
// 2048 x 32000 forward KL + CE at T = 2 in place took 9% fewer perf samples (4877-5298 against 5512-5795, four
// interleaved rounds), JSD 3.5% fewer; several teachers and "mapped" did not move beyond the rounds' spread. Within
// 1.07 ulp of exp over [-87.3365, 0] (exp_reduced's form: 1.02), tests/test_simd_math.py. Other builds keep
// exp_reduced's form: without AVX-512 a 16-entry shuffle is two.
constexpr float kExp2Sixteenths[16] = {  // 2^(i / 16) rounded to float
    1.0f, 1.0442737340927124f, 1.0905077457427979f, 1.1387885808944702f, 1.1892070770263672f, 1.2418577671051025f,
    1.2968395948410034f, 1.3542555570602417f, 1.4142135381698608f, 1.4768261909484863f, 1.5422108173370361f,
    1.610490322113037f, 1.6817928552627563f, 1.7562521696090698f, 1.8340080976486206f, 1.9152065515518188f};

// exp(r) - 1 for x = k ln 2 / 16 + r, with `shifted`, whose bits are 0x4b400000 + k (k rounded by the 1.5 * 2^23
// trick), so that their low four hold k mod 16. ln 2 / 16 in two parts, the first exact times any |k| < 2^12.
template <typename F>
inline F exp_sixteenths_reduced(F x, F* shifted_out) {
  const F shifted = x * 23.083120654223414f + 12582912.0f;
  const F k = shifted - 12582912.0f;
  F r = x - k * 0.0433197021484375f;
  r = r - k * 1.9966364561696537e-06f;
  *shifted_out = shifted;
  return ((r * (1.0f / 6.0f) + 0.5f) * r + 1.0f) * r;
}

// floor(k / 16) in a float's exponent field, from the bits of `shifted`: ((k >> 4) << 23) is ((bits & ~15) << 19)
// modulo 2^32, since 0x4b400000 << 19 is 0 there. Added to the table entry's bits it scales the entry by
// 2^floor(k / 16) exactly: the result is a normal float for every k >= -2016 (x >= -87.3365).
inline uint32_t exponent_of_k(int32_t shifted_bits) { return (static_cast<uint32_t>(shifted_bits) & ~15u) << 19; }

inline float exp2_sixteenth_scaled(float shifted) {
  const int32_t bits = float_as_bits(shifted);
  return bits_as_float(static_cast<int32_t>(static_cast<uint32_t>(float_as_bits(kExp2Sixteenths[bits & 15])) +
                                            exponent_of_k(bits)));
}
inline VFloat exp2_sixteenth_scaled(VFloat shifted) {  // lane by lane: the form the vpermps one is held to
  VFloat value;
  for (int lane = 0; lane < kLanes; ++lane) value[lane] = exp2_sixteenth_scaled(shifted[lane]);
  return value;
}

inline float fused_multiply_add(float a, float b, float c) { return std::fma(a, b, c); }
inline VFloat fused_multiply_add(VFloat a, VFloat b, VFloat c) {
  VFloat value;
  for (int lane = 0; lane < kLanes; ++lane) value[lane] = std::fma(a[lane], b[lane], c[lane]);
  return value;
}

template <typename F>
inline F fast_exp_centred_generic(F x) {
  F shifted;
  const F small = exp_sixteenths_reduced(x < -87.3365f ? splat<F>(-87.3365f) : x, &shifted);
  const F scaled = exp2_sixteenth_scaled(shifted);  // 2^(k / 16), from the table and k's exponent
  const F result = fused_multiply_add(scaled, small, scaled);
  return x < -87.3365f ? splat<F>(0.0f) : result;
}
#else
template <typename F>
inline F fast_exp_centred_generic(F x) {
  const F result = exp_in_range(x < -87.3365f ? splat<F>(-87.3365f) : x);
  return x < -87.3365f ? splat<F>(0.0f) : result;
}
#endif
template <typename F>
inline F fast_exp_centred(F x) {
  return fast_exp_centred_generic(x);
}

#if defined(__AVX512F__)
// The generic form's values with AVX-512: the table by one vpermps (its index the low four bits of each lane), its
// entries scaled by integer adds to their exponents, and one multiply-add whose mask zeroes x < -87.3365 (-inf there
// makes the arithmetic NaN, which the mask drops; a NaN x keeps its lane and stays NaN).
template <>
inline VFloat fast_exp_centred<VFloat>(VFloat x) {
  VFloat shifted;
  const __m512 small = reinterpret_cast<__m512>(exp_sixteenths_reduced(x, &shifted));
  const __m512i bits = reinterpret_cast<__m512i>(shifted);
  const __m512 table = _mm512_permutexvar_ps(bits, _mm512_loadu_ps(kExp2Sixteenths));
  const __m512i exponent = _mm512_slli_epi32(_mm512_andnot_si512(_mm512_set1_epi32(15), bits), 19);
  const __m512 scaled = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(table), exponent));
  const __m512 v = reinterpret_cast<__m512>(x);
  const __mmask16 kept = _mm512_cmp_ps_mask(v, _mm512_set1_ps(-87.3365f), _CMP_NLT_UQ);  // x >= -87.3365 or NaN
  return reinterpret_cast<VFloat>(_mm512_maskz_fmadd_ps(kept, scaled, small, scaled));
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

// tanh(y), within 2 ulp, and d tanh / dy = 1 - tanh(y)^2, within 4 ulp however close tanh is to +-1: Gemma-2's
// softcap and its chain rule (csrc/cpu/softcap_map.h). Below |y| = 0.625, y + y^3 P(y^2), P a degree-4 fit of
// (tanh(y) - y) / y^3 (least squares in tanh's relative error over Chebyshev nodes of y^2, 0.75 ulp); above it, with
// e = exp(-2|y|) <= 0.29, tanh = (1 - e) / (1 + e) and 1 - tanh^2 = 4e / (1 + e)^2, which keeps the small derivative's
// digits that 1 - tanh^2 from a rounded tanh loses. NaN stays NaN; +-inf gives +-1 and 0.
template <typename F>
inline F fast_tanh(F y, F* derivative) {
  const F magnitude = bits_as_float(float_as_bits(y) & 0x7fffffff);
  const F z = magnitude * magnitude;
  F poly = splat<F>(-5.704042501747608e-3f);
  poly = poly * z + 2.0637862384319305e-2f;
  poly = poly * z - 5.373915657401085e-2f;
  poly = poly * z + 1.33314311504364e-1f;
  poly = poly * z - 3.333328068256378e-1f;
  const F small = magnitude + magnitude * z * poly;
  const F e = fast_exp_centred(-2.0f * magnitude);
  const F large = (1.0f - e) / (1.0f + e);
  const auto near_zero = magnitude < 0.625f;
  const F result = near_zero ? small : large;
  *derivative = near_zero ? 1.0f - small * small : 4.0f * e / ((1.0f + e) * (1.0f + e));
  return bits_as_float(float_as_bits(result) | (float_as_bits(y) & static_cast<int32_t>(0x80000000u)));
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

// A vector block of 16-bit values in one go: the per-lane conversions above kept GCC to scalar code, and a 16-bit
// row's passes ran at a third of a float32 row's speed for half its bytes.
typedef uint32_t VUInt __attribute__((vector_size(kLanes * sizeof(uint32_t))));
typedef uint16_t VBits16 __attribute__((vector_size(kLanes * sizeof(uint16_t))));
typedef _Float16 VHalf __attribute__((vector_size(kLanes * sizeof(_Float16))));

inline void store_grad(BFloat16* out, VFloat value) {
  const VUInt bits = __builtin_bit_cast(VUInt, value);
  const VUInt rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;  // to nearest even, as from_float
  const VUInt nan = __builtin_bit_cast(VUInt, value != value);          // all ones where NaN: a quiet NaN
  const VBits16 narrow = __builtin_convertvector((nan & 0x7fc0u) | (~nan & rounded), VBits16);
  std::memcpy(out, &narrow, sizeof(narrow));
}
inline void store_grad(Float16* out, VFloat value) {
  const VHalf half = __builtin_convertvector(value, VHalf);
  std::memcpy(out, &half, sizeof(half));
}
inline VFloat load_wide(const BFloat16* in) {
  VBits16 raw;
  std::memcpy(&raw, in, sizeof(raw));
  return __builtin_bit_cast(VFloat, __builtin_convertvector(raw, VUInt) << 16);
}
inline VFloat load_wide(const Float16* in) {
  VHalf raw;
  std::memcpy(&raw, in, sizeof(raw));
  return __builtin_convertvector(raw, VFloat);
}

}  // namespace kdfast_cpu
