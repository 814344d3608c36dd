// Device helpers for the distillation kernels: 16-byte loads and stores, base-2 fast math, and the
// per-row statistics with their merge (docs/DESIGN.md, "Algorithms").
//
// Everything runs in base 2, so each exponential is one ex2.approx instruction: an exponent is
// (s - m) * k with k = log2(e) / T. Maxima stay in the logits' own units and are subtracted before the
// scaling: s * k - m * k would round each product at |s| ~ 1e3 by ~1e-4, a 1e-4 relative error in every
// probability. Stats keep, for the student (s) and the teacher (t), the running max m and the sum z of
// 2^((x - m) * k); `acc` is the centred sum that yields forward KL (sum 2^(dt) * (dt - ds)) or reverse KL
// without another pass over the row; z_c is the student's sum at T = 1 when cross-entropy cannot reuse the
// tempered one (the max is the same logit at every temperature). Reverse KL and the mixtures also keep the
// reference entry r, the student's argmax (ref_col), with the teacher's logit there (t_ref): reverse KL's acc is
// sum 2^(ds) * ((s - m_s) - (t - t_ref)) * k, which is 0 at r and has no cancellation near a dominant entry.
// e_d is sum 2^(ds) * ds, ds = (s - m_s) * k <= 0: the student's entropy at the kernel's temperature is
// ln2 * (log2 z_s - e_d / z_s), two terms >= 0 (nothing cancels), with no pass of its own.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace kdfast_cuda {

constexpr float kLn2 = 0.693147180559945309f;
constexpr float kLog2e = 1.442695040888963407f;
constexpr float kNegInf = -__builtin_huge_valf();

// How cross-entropy gets softmax(s) at T = 1: not at all, the tempered statistics themselves (T = 1, or no
// KD, where the kernel runs at T = 1), their squares (T = 2: 2^(2x) needs no new exponential), or its own.
enum CeStats : int { kCeNone = 0, kCeShared = 1, kCeSquared = 2, kCeOwn = 3 };

// Kernel modes: the two-pass divergences, the three-pass mixtures (JSD and the skews, chosen at run
// time), and cross-entropy alone.
enum Mode : int { kModeForwardKL = 0, kModeReverseKL = 1, kModeMixture = 2, kModeCeOnly = 3 };

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float fast_log2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// 0 * anything = 0: a zero probability adds nothing, even against a log of -inf.
__device__ __forceinline__ float weighted(float prob, float log_ratio) {
  return prob == 0.0f ? 0.0f : prob * log_ratio;
}

// log2(1 + e) for e in [0, 1], a log-sum-exp's correction term, to a few ulp of the result however small e is
// (csrc/cpu/simd_math.h's log1p_unit, in base 2): 2 atanh(f) / ln 2, f = e / (2 + e) <= 1/3, by its series to f^15.
// lg2.approx(1 + e) errs by up to 2^-22 absolute and drops every bit of e below 2^-24, and JSD near beta = 0 or 1 is
// a sum of such terms (on the CPU, 1% of its gradient lost at beta = 1e-6).
__device__ __forceinline__ float log2_1p_unit(float e) {
  const float f = __fdividef(e, 2.0f + e);  // 2 + e in [2, 3]: within __fdividef's exact range
  const float f2 = f * f;
  float series = 1.0f / 15.0f;
  series = fmaf(series, f2, 1.0f / 13.0f);
  series = fmaf(series, f2, 1.0f / 11.0f);
  series = fmaf(series, f2, 1.0f / 9.0f);
  series = fmaf(series, f2, 1.0f / 7.0f);
  series = fmaf(series, f2, 1.0f / 5.0f);
  series = fmaf(series, f2, 1.0f / 3.0f);
  return (2.0f * kLog2e) * f * fmaf(f2, series, 1.0f);
}

__device__ __forceinline__ float log2_add_exp2(float a, float b) {
  const float hi = fmaxf(a, b), lo = fminf(a, b);
  // fmaxf / fminf drop a NaN operand; the NaN must reach the row's loss instead.
  if (a != a || b != b) return a + b;
  return hi == kNegInf ? hi : hi + log2_1p_unit(fast_exp2(lo - hi));
}

// A max that is -inf serves as 0 for exponentials (so 2^(-inf - ref) = 0, never NaN).
__device__ __forceinline__ float safe_ref(float m) { return m == kNegInf ? 0.0f : m; }

// How far a max moved (0 when it did not, including -inf to -inf).
__device__ __forceinline__ float shift(float m_new, float m_old) { return m_new == m_old ? 0.0f : m_new - m_old; }

// ---- 8 consecutive elements as floats: one 16-byte access for 16-bit types, two for float32 ----
__device__ __forceinline__ void load8(const float* p, float (&out)[8]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w, out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
}
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float (&out)[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // bf16 is the top half of a float32
    out[2 * i] = __uint_as_float(words[i] << 16);
    out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
  }
}
__device__ __forceinline__ void load8(const __half* p, float (&out)[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const __half2* pairs = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(pairs[i]);
    out[2 * i] = f.x, out[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ void store8(float* p, const float (&in)[8]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(in[0], in[1], in[2], in[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(in[4], in[5], in[6], in[7]);
}
__device__ __forceinline__ void store8(__nv_bfloat16* p, const float (&in)[8]) {
  uint4 raw;
  __nv_bfloat162* pairs = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) pairs[i] = __floats2bfloat162_rn(in[2 * i], in[2 * i + 1]);
  *reinterpret_cast<uint4*>(p) = raw;
}
__device__ __forceinline__ void store8(__half* p, const float (&in)[8]) {
  uint4 raw;
  __half2* pairs = reinterpret_cast<__half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) pairs[i] = __floats2half2_rn(in[2 * i], in[2 * i + 1]);
  *reinterpret_cast<uint4*>(p) = raw;
}

__device__ __forceinline__ float load1(const float* p) { return *p; }
__device__ __forceinline__ float load1(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float load1(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ void store1(float* p, float v) { *p = v; }
__device__ __forceinline__ void store1(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store1(__half* p, float v) { *p = __float2half_rn(v); }

// Whether a mode keeps the reference entry r (the student's argmax) in its statistics.
template <int MODE>
constexpr bool kCentred = MODE == kModeReverseKL || MODE == kModeMixture;

struct Stats {
  float m_s, z_s, m_t, z_t, acc, z_c, t_ref, ref_col;  // ref_col: a column index (exact in float below 2^24)
  float e_d;                                           // sum 2^(ds) * ds: the student's entropy
};
constexpr int kStatsFloats = 9;

__device__ __forceinline__ Stats empty_stats() {
  return Stats{kNegInf, 0.0f, kNegInf, 0.0f, 0.0f, 0.0f, 0.0f, -1.0f, 0.0f};
}

// Re-expresses a partial state relative to new maxima (m_s, m_t >= its own) and, in the centred modes, a new
// reference (t_ref, ref_col): the one rule used both by the running update within a thread and by the merge of
// two threads' (or two blocks') states.
template <int MODE>
__device__ __forceinline__ Stats rebase(const Stats& a, float m_s, float m_t, float t_ref, float ref_col, float k,
                                        int ce_stats) {
  Stats r = a;
  const float raw_ds = shift(m_s, a.m_s);
  const float ds = raw_ds * k, dt = shift(m_t, a.m_t) * k;
  const float scale_s = ds == 0.0f ? 1.0f : fast_exp2(-ds);
  const float scale_t = dt == 0.0f ? 1.0f : fast_exp2(-dt);
  if (MODE == kModeForwardKL) {
    r.acc = scale_t * (a.acc + (a.z_t == 0.0f ? 0.0f : a.z_t * (ds - dt)));
  } else if (MODE == kModeReverseKL) {
    const float dref = (t_ref - a.t_ref) * k;  // (s - m) - (t - t_ref) moves by -ds + dref
    r.acc = scale_s * (a.acc + (a.z_s == 0.0f ? 0.0f : a.z_s * (dref - ds)));
  }
  r.m_s = m_s, r.m_t = m_t;
  r.t_ref = t_ref, r.ref_col = ref_col;
  r.z_s = a.z_s * scale_s;
  // Every exponent moves by -ds and every exp scales by 2^-ds; a state holding only -inf has nothing to move.
  r.e_d = a.z_s == 0.0f ? 0.0f : scale_s * (a.e_d - ds * a.z_s);
  r.z_t = a.z_t * scale_t;
  if (ce_stats == kCeSquared) r.z_c = a.z_c * scale_s * scale_s;
  if (ce_stats == kCeOwn) r.z_c = a.z_c * (raw_ds == 0.0f ? 1.0f : fast_exp2(-raw_ds * kLog2e));
  return r;
}

template <int MODE>
__device__ __forceinline__ Stats merge(const Stats& a, const Stats& b, float k, int ce_stats) {
  const float m_s = fmaxf(a.m_s, b.m_s), m_t = fmaxf(a.m_t, b.m_t);
  float t_ref = a.t_ref, ref_col = a.ref_col;
  if (kCentred<MODE>) {
    // The reference entry is the first column holding the larger max (ties: the lower column, as on the CPU).
    const bool b_wins = b.m_s > a.m_s ||
                        (b.m_s == a.m_s && b.ref_col >= 0.0f && (a.ref_col < 0.0f || b.ref_col < a.ref_col));
    if (b_wins) t_ref = b.t_ref, ref_col = b.ref_col;
  }
  const Stats x = rebase<MODE>(a, m_s, m_t, t_ref, ref_col, k, ce_stats);
  const Stats y = rebase<MODE>(b, m_s, m_t, t_ref, ref_col, k, ce_stats);
  return Stats{m_s, x.z_s + y.z_s, m_t, x.z_t + y.z_t, x.acc + y.acc, x.z_c + y.z_c, t_ref, ref_col, x.e_d + y.e_d};
}

// Folds N elements (s, t: raw logits of student and teacher; the first at column `col`) into a thread's running
// state: one rebase per N elements when a max moved, then one exponential per element and model.
template <int MODE, int N>
__device__ __forceinline__ void accumulate(Stats& st, const float (&s)[N], const float (&t)[N], int64_t col, float k,
                                           int ce_stats) {
  constexpr bool kKD = MODE != kModeCeOnly;
  float ms = kNegInf, mt = kNegInf, t_at_max = 0.0f;
  int at_max = 0;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    if (kCentred<MODE>) {
      // The teacher's logit is taken here, not as t[at_max] after the loop: a runtime index would move the
      // arrays to local memory.
      if (s[i] > ms) ms = s[i], at_max = i, t_at_max = t[i];
    } else {
      ms = fmaxf(ms, s[i]);
    }
    if (kKD) mt = fmaxf(mt, t[i]);
  }
  if (ms > st.m_s || mt > st.m_t) {  // rare once a row is under way
    float t_ref = st.t_ref, ref_col = st.ref_col;
    if (kCentred<MODE> && ms > st.m_s) {
      t_ref = t_at_max;
      ref_col = static_cast<float>(col + at_max);
      // No teacher mass at r makes reverse KL infinite anyway: any finite reference then serves.
      if (MODE == kModeReverseKL && t_ref == kNegInf) t_ref = safe_ref(fmaxf(st.m_t, mt));
    }
    st = rebase<MODE>(st, fmaxf(st.m_s, ms), fmaxf(st.m_t, mt), t_ref, ref_col, k, ce_stats);
  }
  const float ref_s = safe_ref(st.m_s), ref_t = safe_ref(st.m_t);
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const float ds = (s[i] - ref_s) * k;
    const float e_s = fast_exp2(ds);
    st.z_s += e_s;
    st.e_d += weighted(e_s, ds);  // a logit of -inf adds 0
    if (ce_stats == kCeSquared) st.z_c += e_s * e_s;
    if (ce_stats == kCeOwn) st.z_c += fast_exp2((s[i] - ref_s) * kLog2e);
    if (kKD) {
      const float dt = (t[i] - ref_t) * k;
      const float e_t = fast_exp2(dt);
      st.z_t += e_t;
      if (MODE == kModeForwardKL) st.acc += weighted(e_t, dt - ds);
      if (MODE == kModeReverseKL) st.acc += weighted(e_s, ((s[i] - ref_s) - (t[i] - st.t_ref)) * k);
    }
  }
}

template <int MODE>
__device__ __forceinline__ Stats shuffle_xor(const Stats& a, int lane_mask) {
  Stats b;
  b.m_s = __shfl_xor_sync(0xffffffffu, a.m_s, lane_mask);
  b.z_s = __shfl_xor_sync(0xffffffffu, a.z_s, lane_mask);
  b.m_t = __shfl_xor_sync(0xffffffffu, a.m_t, lane_mask);
  b.z_t = __shfl_xor_sync(0xffffffffu, a.z_t, lane_mask);
  b.acc = __shfl_xor_sync(0xffffffffu, a.acc, lane_mask);
  b.z_c = __shfl_xor_sync(0xffffffffu, a.z_c, lane_mask);
  b.e_d = __shfl_xor_sync(0xffffffffu, a.e_d, lane_mask);
  if (kCentred<MODE>) {
    b.t_ref = __shfl_xor_sync(0xffffffffu, a.t_ref, lane_mask);
    b.ref_col = __shfl_xor_sync(0xffffffffu, a.ref_col, lane_mask);
  }
  return b;
}

// Block-wide merge of every thread's state; all threads get the result. `scratch` holds one Stats per warp.
template <int MODE, int THREADS>
__device__ Stats block_merge(Stats st, Stats* scratch, float k, int ce_stats) {
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) st = merge<MODE>(st, shuffle_xor<MODE>(st, mask), k, ce_stats);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read from an earlier reduction
  if (lane == 0) scratch[warp] = st;
  __syncthreads();
  Stats total = scratch[0];
#pragma unroll
  for (int w = 1; w < THREADS / 32; ++w) total = merge<MODE>(total, scratch[w], k, ce_stats);
  return total;
}

template <int THREADS>
__device__ float2 block_sum2(float2 v, float2* scratch) {
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) {
    v.x += __shfl_xor_sync(0xffffffffu, v.x, mask);
    v.y += __shfl_xor_sync(0xffffffffu, v.y, mask);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float2 total = make_float2(0.0f, 0.0f);
#pragma unroll
  for (int w = 0; w < THREADS / 32; ++w) total.x += scratch[w].x, total.y += scratch[w].y;
  return total;
}

}  // namespace kdfast_cuda
