// The distillation row kernels, templated on the student and teacher element types and the mode; each
// distill_rows_<dtype>.cu instantiates one student type (so ninja compiles them in parallel).
//
// FUSED, one block per row (distill_row_kernel) when rows fill the GPU:
//   pass 1  statistics (and forward/reverse KL from the centred sum)        read 2 x row
//   pass 2  mixtures only (JSD, skews): loss terms and D = sum q d           read 2 x row
//   last    the gradient, written over a fresh buffer or the logits          read 2 x row, write 1 x row
// Forward KL in bf16 moves 2 + 2 + 2 + 2 + 2 = 10 bytes per element. The last pass runs in the opposite
// direction to the pass before it, so it starts on the part of the row that is still in L2.
// The same passes run a few long rows as three kernels over vocab ranges (split_rows.cuh) and a vocab shard's
// phases (shard_rows.cuh); row_launchers.cuh picks the kernels.
// Reverse KL and the mixtures are centred on the student's argmax r (fused): reverse KL's gradient is
// q (c - D) with c = ((s - s_r) - (t - t_r)) / T, a mixture's q (d - D) with d = h - h_r, d_r = 0.
#pragma once

#include <type_traits>

#include "distill_kernel.h"
#include "distill_math.cuh"
#include "mixed_teachers.cuh"

namespace kdfast_cuda {

using namespace kdfast;  // the divergence and phase codes

constexpr int kThreads = 256;
// Stats, the student's logit at the label, and (label smoothing) the range's sum of s - its own max
constexpr int kWorkspaceStats = kStatsFloats + 2;
constexpr int kWorkspaceTerms = 2;  // mixtures: sum of loss terms, D

struct Launch {
  DistillArgs a;
  float k;             // log2(e) / T: exponents are (x - max) * k (T = 1 without KD)
  float one_minus_beta;  // 1 - beta from the host's double (kernel_abi.h)
  float log2_beta, log2_1m_beta;
  bool exact_log1p;  // JSD's log2(1 + e) by its series: beta or 1 - beta below 1/16 (distill_launch.cu)
  int ce_stats;        // CeStats
};

template <typename S, typename T>
struct RowPointers {
  const S* s;
  typename TeacherRowOf<T>::type t;  // a pointer, or several teachers' rows (Mixed<E>: mixed_teachers.cuh)
  S* g;
  bool vector_ok;  // every row pointer 16-byte aligned: 8-element vector accesses
};

template <typename S, typename T>
__device__ __forceinline__ RowPointers<S, T> row_pointers(const Launch& L, int64_t row) {
  const DistillArgs& a = L.a;
  const int64_t b = row / a.rows_per_batch, r = row % a.rows_per_batch;
  RowPointers<S, T> p;
  p.s = static_cast<const S*>(a.student) + b * a.student_stride_b + r * a.student_stride_r;
  if constexpr (kIsMixed<T>) {
    p.t = mixed_row<typename T::Element>(a, L.k, row, b * a.teacher_stride_b + r * a.teacher_stride_r);
  } else {
    p.t = static_cast<const T*>(a.teacher) + b * a.teacher_stride_b + r * a.teacher_stride_r;
  }
  p.g = a.grad ? static_cast<S*>(a.grad) + b * a.grad_stride_b + r * a.grad_stride_r : nullptr;
  const auto misaligned = [](const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) != 0; };
  if constexpr (kIsMixed<T>) {
    p.vector_ok = !misaligned(p.s) && aligned_rows(p.t) && !(p.g && misaligned(p.g));
  } else {
    p.vector_ok = !misaligned(p.s) && !(a.has_kd && misaligned(p.t)) && !(p.g && misaligned(p.g));
  }
  return p;
}

// Calls fn(col, s[N], t[N]) over [begin, end) with each thread's share: 8-element vectors (two in flight
// per thread), then single elements for the ragged end (or everything, when the row is misaligned).
template <bool KD, typename S, typename T, typename Fn>
__device__ __forceinline__ void for_each_block_of_row(const RowPointers<S, T>& p, int64_t begin, int64_t end,
                                                      bool reverse, Fn&& fn) {
  const int64_t vectors = p.vector_ok ? (end - begin) / 8 : 0;
  for (int64_t i = threadIdx.x; i < vectors; i += 2 * kThreads) {
    const int64_t i1 = i + kThreads;
    const bool second = i1 < vectors;
    const int64_t c0 = begin + 8 * (reverse ? vectors - 1 - i : i);
    const int64_t c1 = begin + 8 * (reverse ? vectors - 1 - i1 : i1);
    float s0[8], t0[8] = {}, s1[8], t1[8] = {};
    load8(p.s + c0, s0);
    if (KD) load_teacher8(p.t, c0, t0);
    if (second) {
      load8(p.s + c1, s1);
      if (KD) load_teacher8(p.t, c1, t1);
    }
    fn(c0, s0, t0);
    if (second) fn(c1, s1, t1);
  }
  for (int64_t col = begin + 8 * vectors + threadIdx.x; col < end; col += kThreads) {
    float s1[1] = {load1(p.s + col)}, t1[1] = {KD ? load_teacher1(p.t, col) : 0.0f};
    fn(col, s1, t1);
  }
}

// The element count N of the float (&)[N] a traversal hands its callback.
template <typename A>
constexpr int kLanesOf = static_cast<int>(std::extent<std::remove_reference_t<A>>::value);

// ---- pass 1: each thread's running statistics over [begin, end), merged over the block ----
template <int MODE, typename S, typename T>
__device__ Stats range_stats(const Launch& L, const RowPointers<S, T>& p, int64_t begin, int64_t end,
                             Stats* scratch) {
  Stats st = empty_stats();
  const float k = L.k;
  const int ce_stats = L.ce_stats;
  for_each_block_of_row<MODE != kModeCeOnly>(p, begin, end, false, [&](int64_t col, auto& s, auto& t) {
    accumulate<MODE, kLanesOf<decltype(s)>>(st, s, t, col, k, ce_stats);
  });
  return block_merge<MODE, kThreads>(st, scratch, k, ce_stats);
}

// JSD and the skews: the element's loss term and score h = dL/dq (natural units, up to a constant), from
// x = log2 p - log2 q: log2(m / q) and log2(m / p) are log-sum-exps of x and a constant, exact in both limits of a
// near-one-hot row. beta > 0 here (beta = 0 is a plain KL).
__device__ __forceinline__ void mixture_terms(const Launch& L, float lq, float lp, float q, float p, float& term,
                                              float& h) {
  const int divergence = L.a.divergence;
  const float beta = L.a.beta, one_minus_beta = L.one_minus_beta, log2_beta = L.log2_beta;
  const float log2_1m_beta = L.log2_1m_beta;
  const float x = lp - lq;
  if (divergence == kJSD) {  // m = b p + (1 - b) q
    // Each log ratio a log-sum-exp of its own (log(p / m) as x - log(m / q) loses |x| * eps where p dominates);
    // both share log2(1 + 2^-|y|), y = x + log2(b / (1 - b)), and swap exactly with p and q at b = 0.5. A NaN
    // reaches both through the shared term (fmaxf drops it).
    const float e = fast_exp2(-fabsf(x + (log2_beta - log2_1m_beta)));
    // lg2.approx(1 + e) (2^-22 absolute) where both weights are large, as measured on an H200; the exact series where
    // one is small and the log ratios with it (Launch::exact_log1p).
    const float shared = L.exact_log1p ? log2_1p_unit(e) : fast_log2(1.0f + e);
    const float log2_m_over_q = fmaxf(x + log2_beta, log2_1m_beta) + shared;
    const float log2_m_over_p = fmaxf(log2_1m_beta - x, log2_beta) + shared;
    term = -kLn2 * (beta * weighted(p, log2_m_over_p) + one_minus_beta * weighted(q, log2_m_over_q));
    h = -one_minus_beta * kLn2 * log2_m_over_q;
  } else if (divergence == kSkewForwardKL) {  // KL(p || m), m = b p + (1 - b) q: p / m <= 1 / b
    const float log2_m_over_p = log2_add_exp2(log2_beta, log2_1m_beta - x);
    term = -kLn2 * weighted(p, log2_m_over_p);
    h = -one_minus_beta * fast_exp2(-log2_m_over_p);
  } else if (divergence == kTVD) {  // 0.5 * sum |p - q|; h its subgradient, -0.5 where q == p (Liger's)
    term = 0.5f * fabsf(p - q);
    h = q > p ? 0.5f : -0.5f;
  } else {  // skew reverse KL: KL(q || m), m = (1 - b) p + b q: q / m <= 1 / b
    const float log2_m_over_q = log2_add_exp2(log2_beta, x + log2_1m_beta);
    term = -kLn2 * weighted(q, log2_m_over_q);
    // -ln(m / q) - b q / m shifted by +1 (centring drops it): (1 - b) p / m - ln(m / q), with no O(1) part for the
    // gradient's O(1 - b) to round against near b = 1 (on the CPU, 3% of it lost at b = 0.9999).
    h = one_minus_beta * fast_exp2(x - log2_m_over_q) - kLn2 * log2_m_over_q;
  }
}

// Per-row constants of a fused row from its merged statistics. log2 q_j = (s_j - ref_s) * k - log2_z_s, and
// alike for p.
struct RowConstants {
  float ref_s, ref_t;  // the maxima, in logit units
  float log2_z_s, log2_z_t, log2_z_c;
  float squared_ce;    // kCeSquared: softmax(s)_j = q_j^2 * squared_ce
  float closed_kd;     // forward / reverse KL, from the centred sum
  float rkl_d;         // reverse KL: D = ln2 * sum q c, the gradient's row sum
  float t_ref;         // reverse KL's centring reference
  int64_t ref_col;     // r, the reference entry (centred modes), else -1
  float h_ref;         // mixtures: the score at r
  float entropy;       // the student's, -sum q ln q, at the kernel's temperature (T = 1 without KD)
};

template <int MODE>
__device__ __forceinline__ RowConstants row_constants(const Launch& L, const Stats& st) {
  RowConstants k;
  k.ref_s = safe_ref(st.m_s);
  k.ref_t = safe_ref(st.m_t);
  k.log2_z_s = log2f(st.z_s);
  k.log2_z_t = log2f(st.z_t);
  k.log2_z_c = L.ce_stats == kCeShared ? k.log2_z_s : log2f(st.z_c);
  k.squared_ce = exp2f(2.0f * k.log2_z_s - k.log2_z_c);
  k.closed_kd = k.rkl_d = k.h_ref = 0.0f;
  k.t_ref = st.t_ref;
  k.ref_col = kCentred<MODE> ? static_cast<int64_t>(st.ref_col) : -1;
  k.entropy = kLn2 * (k.log2_z_s - st.e_d / st.z_s);
  if (MODE == kModeForwardKL) k.closed_kd = kLn2 * (st.acc / st.z_t - k.log2_z_t + k.log2_z_s);
  if (MODE == kModeReverseKL) {
    k.rkl_d = kLn2 * (st.acc / st.z_s);
    k.closed_kd = k.rkl_d + kLn2 * ((k.ref_t - st.t_ref) * L.k - k.log2_z_s + k.log2_z_t);
  }
  if (MODE == kModeMixture) {
    const float lq = -k.log2_z_s;  // s_r is the row's max
    const float lp = (st.t_ref - k.ref_t) * L.k - k.log2_z_t;
    float term;
    mixture_terms(L, lq, lp, fast_exp2(lq), fast_exp2(lp), term, k.h_ref);
  }
  return k;
}

// ---- pass 2 (mixtures): sum of terms and D over [begin, end), summed over the block ----
template <typename S, typename T>
__device__ float2 range_mixture_sums(const Launch& L, const RowPointers<S, T>& p, const RowConstants& k,
                                     int64_t begin, int64_t end, bool reverse, float2* scratch) {
  float2 acc = make_float2(0.0f, 0.0f);
  const DistillArgs& a = L.a;
  for_each_block_of_row<true>(p, begin, end, reverse, [&](int64_t col, auto& s, auto& t) {
    constexpr int N = kLanesOf<decltype(s)>;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float lq = (s[i] - k.ref_s) * L.k - k.log2_z_s, lp = (t[i] - k.ref_t) * L.k - k.log2_z_t;
      const float q = fast_exp2(lq);
      float term, h;
      mixture_terms(L, lq, lp, q, fast_exp2(lp), term, h);
      acc.x += term;
      acc.y += col + i == k.ref_col ? 0.0f : weighted(q, h - k.h_ref);
    }
  });
  return block_sum2<kThreads>(acc, scratch);
}

// softmax(s)_j at T = 1 from what a pass already has: q itself (T = 1), q^2 (T = 2), or its own exponential.
__device__ __forceinline__ float ce_probability(int ce_stats, float q, float s, float ref_s, float squared_ce,
                                                float log2_z_c) {
  if (ce_stats == kCeSquared) return q * q * squared_ce;
  if (ce_stats == kCeOwn) return fast_exp2((s - ref_s) * kLog2e - log2_z_c);
  return q;
}

template <typename S, int N>
__device__ __forceinline__ void store_block(S* g, int64_t col, const float (&values)[N]) {
  if constexpr (N == 8) {
    store8(g + col, values);
  } else {
    store1(g + col, values[0]);
  }
}

// ---- last pass (fused): the gradient over [begin, end) ----
// (kd_scale / T) * dL/da + ce_weight * (softmax(s) - onehot(label)), times the reduction's scale.
// kCeExtras: label smoothing or the z-loss is on (their coefficients differ); without them the loop is the plain
// CE's, whose registers the measured kernels were tuned with.
template <int MODE, bool kCeExtras = false, typename S, typename T>
__device__ void range_gradient(const Launch& L, const RowPointers<S, T>& p, const RowConstants& k, float mixture_d,
                               int64_t label, float row_scale, int64_t begin, int64_t end, bool reverse) {
  const DistillArgs& a = L.a;
  const float kd_coef = row_scale * a.kd_scale * a.inv_temperature;
  // The CE family's coefficients (kernel_abi.h): the smoothed target and the z-loss; lse: the student's at T = 1.
  const CeCoefficients ce =
      a.has_ce ? ce_coefficients(a, row_scale, k.ref_s + kLn2 * k.log2_z_c) : CeCoefficients{0.0f, 0.0f, 0.0f};
  const int ce_stats = L.ce_stats;
  for_each_block_of_row<MODE != kModeCeOnly>(p, begin, end, reverse, [&](int64_t col, auto& s, auto& t) {
    constexpr int N = kLanesOf<decltype(s)>;
    float g[N];
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float lq = (s[i] - k.ref_s) * L.k - k.log2_z_s;
      const float q = fast_exp2(lq);
      const float lp = (t[i] - k.ref_t) * L.k - k.log2_z_t;
      float grad_kd = 0.0f;
      if (MODE == kModeForwardKL) grad_kd = q - fast_exp2(lp);
      if (MODE == kModeReverseKL) grad_kd = weighted(q, kLn2 * (((s[i] - k.ref_s) - (t[i] - k.t_ref)) * L.k) - k.rkl_d);
      if (MODE == kModeMixture) {
        float term, h;
        mixture_terms(L, lq, lp, q, fast_exp2(lp), term, h);
        grad_kd = weighted(q, (col + i == k.ref_col ? 0.0f : h - k.h_ref) - mixture_d);
      }
      g[i] = kd_coef * grad_kd;
      if (ce_stats != kCeNone) {
        const float ce_prob = ce_probability(ce_stats, q, s[i], k.ref_s, k.squared_ce, k.log2_z_c);
        if constexpr (kCeExtras) {
          g[i] += ce.soft * ce_prob - (col + i == label ? ce.label : 0.0f) - ce.uniform;
        } else {  // soft = label = row_scale * ce_weight, uniform = 0
          g[i] += ce.soft * (ce_prob - (col + i == label ? 1.0f : 0.0f));
        }
      }
    }
    store_block(p.g, col, g);
  });
}

// sum over [begin, end) of s - ref, summed over the block: label smoothing's uniform part of the CE target. Only
// with label smoothing, and read before any gradient is written over the logits.
template <typename S, typename T>
__device__ float range_shifted_sum(const RowPointers<S, T>& p, float ref, int64_t begin, int64_t end,
                                   float2* scratch) {
  float acc = 0.0f;
  for_each_block_of_row<false>(p, begin, end, false, [&](int64_t, auto& s, auto&) {
    constexpr int N = kLanesOf<decltype(s)>;
#pragma unroll
    for (int i = 0; i < N; ++i) acc += s[i] - ref;
  });
  return block_sum2<kThreads>(make_float2(acc, 0.0f), scratch).x;
}

__device__ __forceinline__ bool smoothing(const DistillArgs& a) { return a.has_ce && a.label_smoothing != 0.0f; }


template <typename S>
__device__ void range_zero(S* g, int64_t begin, int64_t end) {
  for (int64_t col = begin + threadIdx.x; col < end; col += kThreads) store1(g + col, 0.0f);
}

struct RowLabel {
  int64_t label;   // CE's label: its column in this call's range, or -1
  int64_t column;  // the label's column in this call's range whether or not CE is on (token accuracy), or -1
  bool keep, label_ok;
};

__device__ __forceinline__ RowLabel row_label(const DistillArgs& a, int64_t row) {
  RowLabel r{-1, -1, true, false};
  if (a.labels) {
    const int64_t label = a.labels[row];
    r.keep = label != a.ignore_index;
    const int64_t local = label - a.col_offset;  // labels are global token ids
    const bool in_range = local >= 0 && local < a.vocab;
    r.column = in_range ? local : -1;
    r.label_ok = a.has_ce && in_range;
    r.label = r.label_ok ? local : -1;
  }
  return r;
}

// The CE target's logit relative to ref: the label's, or (1 - eps) s_label + eps mean(s) with label smoothing
// (shifted_sum: sum_j s_j - ref over the row, or a shard's raw sum with ref 0).
__device__ __forceinline__ float ce_target(const DistillArgs& a, bool in_range, float s_label, float ref,
                                           float shifted_sum) {
  const float target = in_range ? s_label - ref : 0.0f;
  if (!smoothing(a)) return target;
  const float eps = a.label_smoothing;
  return (1.0f - eps) * target + eps * shifted_sum / static_cast<float>(a.global_vocab);
}

// A fused row's parts (kPartColumns, before any weight), written by one thread: the divergence, the CE (log sum
// exp(s) - target = ln z_c - (target - max), the difference taken first: |s| may be ~1e3), the z-loss, and whether
// the label's logit is the row's largest (a tie counts), and the student's entropy (at T with KD; CE alone: at T = 1,
// where the kernel runs; neither: 0). A row whose label is out of range (refused on the host where that costs no
// sync) is poisoned: NaN parts.
template <int MODE>
__device__ __forceinline__ void write_row_parts(const Launch& L, const RowConstants& k, float mixture_kd,
                                                bool label_ok, bool in_range, float s_label, float shifted_sum,
                                                float* parts) {
  const DistillArgs& a = L.a;
  const float nan = __int_as_float(0x7fc00000);
  const bool poisoned = a.ce_weight != 0.0f && !label_ok;
  const float kd = MODE == kModeCeOnly ? 0.0f : (MODE == kModeMixture ? mixture_kd : k.closed_kd);
  const float target = ce_target(a, in_range, s_label, k.ref_s, shifted_sum);
  const float lse = k.ref_s + kLn2 * k.log2_z_c;
  parts[kPartKd] = poisoned ? nan : kd;
  parts[kPartCe] = a.has_ce ? (poisoned ? nan : kLn2 * k.log2_z_c - target) : 0.0f;
  parts[kPartZ] = a.has_ce && a.z_loss_weight != 0.0f ? (poisoned ? nan : lse * lse) : 0.0f;
  parts[kPartCorrect] = in_range && s_label >= k.ref_s ? 1.0f : 0.0f;
  parts[kPartEntropy] = poisoned ? nan : (MODE != kModeCeOnly || a.has_ce ? k.entropy : 0.0f);
}

// ---- FUSED, one block per row ----
// EXTRAS: label smoothing or the z-loss (ce_extras), a separate instantiation so that the plain kernels keep their
// registers.
template <typename S, typename T, int MODE, bool EXTRAS>
__global__ void __launch_bounds__(kThreads) distill_row_kernel(const Launch L) {
  __shared__ Stats stats_scratch[kThreads / 32];
  __shared__ float2 sum_scratch[kThreads / 32];
  const DistillArgs& a = L.a;
  const int64_t row = blockIdx.x;
  const RowPointers<S, T> p = row_pointers<S, T>(L, row);
  const RowLabel lab = row_label(a, row);
  if (!lab.keep) {
    if (p.g) range_zero(p.g, 0, a.vocab);
    if (threadIdx.x < kPartColumns) a.out[row * kPartColumns + threadIdx.x] = 0.0f;
    return;
  }
  const bool label_ok = lab.label_ok, in_range = lab.column >= 0;  // (flags, not the 64-bit column, stay live)
  // Read before any thread writes the gradient over the logits (inplace_backward); the barriers in the
  // reductions below order it before those writes.
  const float s_label = (lab.column >= 0 && threadIdx.x == 0) ? load1(p.s + lab.column) : 0.0f;
  const Stats st = range_stats<MODE>(L, p, 0, a.vocab, stats_scratch);
  const RowConstants k = row_constants<MODE>(L, st);
  float2 sums = make_float2(0.0f, 0.0f);
  if (MODE == kModeMixture) sums = range_mixture_sums(L, p, k, 0, a.vocab, true, sum_scratch);
  // Label smoothing's sum, read before the gradient may overwrite the logits.
  const float shifted_sum = smoothing(a) ? range_shifted_sum(p, k.ref_s, 0, a.vocab, sum_scratch) : 0.0f;
  // The parts before the gradient pass: nothing of them then stays live through it.
  if (threadIdx.x == 0) {
    write_row_parts<MODE>(L, k, sums.x, label_ok, in_range, s_label, shifted_sum, a.out + row * kPartColumns);
  }
  if (p.g) {
    const float row_scale = *a.grad_scale;
    range_gradient<MODE, EXTRAS>(L, p, k, sums.y, lab.label, row_scale, 0, a.vocab, MODE != kModeMixture);
  }
}

}  // namespace kdfast_cuda
