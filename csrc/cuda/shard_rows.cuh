// A vocab shard's phases (docs/DESIGN.md, "Shards and phases"), one block per row, on distill_rows.cuh's
// passes: STATS (pass 1 alone, the log-sum-exps out), then SUMS or GRADIENT (one pass from the global
// log-sum-exps).
#pragma once

#include "distill_rows.cuh"

namespace kdfast_cuda {

// ---- a vocab shard: STATS, one block per row ----
// Out: the row's log-sum-exps over this shard [student at T, teacher at T, student at 1] (natural log), and 0 where
// SUMS puts its entropy sum.
template <typename S, typename T, int MODE>
__global__ void __launch_bounds__(kThreads) distill_stats_kernel(const Launch L) {
  __shared__ Stats stats_scratch[kThreads / 32];
  const DistillArgs& a = L.a;
  const int64_t row = blockIdx.x;
  float* out = a.out + row * kStatColumns;
  if (!row_label(a, row).keep) {
    if (threadIdx.x < kStatColumns) out[threadIdx.x] = 0.0f;
    return;
  }
  const RowPointers<S, T> p = row_pointers<S, T>(L, row);
  const Stats st = range_stats<MODE>(L, p, 0, a.vocab, stats_scratch);
  if (threadIdx.x == 0) {
    const float ref_s = safe_ref(st.m_s), ref_t = safe_ref(st.m_t);
    out[0] = a.has_kd ? kLn2 * (ref_s * L.k + log2f(st.z_s)) : 0.0f;
    out[1] = a.has_kd ? kLn2 * (ref_t * L.k + log2f(st.z_t)) : 0.0f;
    // At T = 1 (or without KD, where the kernel runs at T = 1) the tempered sum is CE's own.
    const float log2_z_c = L.ce_stats == kCeShared ? ref_s * L.k + log2f(st.z_s) : ref_s * kLog2e + log2f(st.z_c);
    out[2] = a.has_ce ? kLn2 * log2_z_c : 0.0f;
    out[3] = 0.0f;
  }
}

// ---- a vocab shard: SUMS or GRADIENT from the global log-sum-exps, one pass, one block per row ----
// SUMS out: [divergence terms, D, the CE target's logit (the label's, 0 where another rank holds it; smoothed with
// label smoothing), sum q ln q over these columns (q at T from the global lse; CE alone: at T = 1)]; forward KL and
// CE also write their gradient. GRADIENT: q (c - D) (reverse KL, c = log q - log p), q (h - D) (mixtures).
template <typename S, typename T, int MODE, int PHASE>
__global__ void __launch_bounds__(kThreads) distill_shard_kernel(const Launch L) {
  __shared__ float2 sum_scratch[kThreads / 32];
  const DistillArgs& a = L.a;
  const int64_t row = blockIdx.x;
  const RowLabel lab = row_label(a, row);
  const RowPointers<S, T> p = row_pointers<S, T>(L, row);
  if (!lab.keep) {
    if (p.g) range_zero(p.g, 0, a.vocab);
    if (PHASE == kPhaseSums && threadIdx.x < kStatColumns) a.out[row * kStatColumns + threadIdx.x] = 0.0f;
    return;
  }
  const float* given = a.row_stats + row * kStatColumns;
  const float log2_z_c = given[2] * kLog2e;
  // References 0: log2 q = s * k - log2 z. Without KD the kernel runs at T = 1 on CE's own statistics.
  const float log2_z_s = a.has_kd ? given[0] * kLog2e : log2_z_c;
  const float log2_z_t = given[1] * kLog2e;
  const float squared_ce = exp2f(2.0f * log2_z_s - log2_z_c);
  const float total_d = PHASE == kPhaseGradient ? a.row_totals[row * kStatColumns + 1] : 0.0f;
  const float s_label = (lab.column >= 0 && threadIdx.x == 0) ? load1(p.s + lab.column) : 0.0f;
  __syncthreads();  // the label's logit is read before any thread writes the gradient over the logits
  const float row_scale = p.g ? *a.grad_scale : 0.0f;
  const float kd_coef = row_scale * a.kd_scale * a.inv_temperature;
  // The CE family's coefficients (kernel_abi.h), from the global log-sum-exp at T = 1.
  const CeCoefficients ce = a.has_ce ? ce_coefficients(a, row_scale, given[2]) : CeCoefficients{0.0f, 0.0f, 0.0f};
  const int ce_stats = L.ce_stats;
  const bool smooth = PHASE == kPhaseSums && smoothing(a);
  float s_sum = 0.0f;  // label smoothing: this shard's sum of s (references are 0 here)
  float q_log2_q = 0.0f;  // SUMS: the entropy's share, sum q log2 q (log2 q = lq: the global lse is in log2_z_s)
  float2 acc = make_float2(0.0f, 0.0f);
  for_each_block_of_row<MODE != kModeCeOnly>(p, 0, a.vocab, false, [&](int64_t col, auto& s, auto& t) {
    constexpr int N = kLanesOf<decltype(s)>;
    float g[N];
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float lq = s[i] * L.k - log2_z_s;
      const float q = fast_exp2(lq);
      float grad_kd = 0.0f;
      if (MODE != kModeCeOnly) {
        const float lp = t[i] * L.k - log2_z_t;
        const float pt = fast_exp2(lp);
        if (MODE == kModeForwardKL) {
          acc.x += kLn2 * weighted(pt, lp - lq);
          grad_kd = q - pt;
        } else if (MODE == kModeReverseKL) {
          const float c = kLn2 * (lq - lp);
          acc.x += weighted(q, c);
          grad_kd = weighted(q, c - total_d);
        } else {
          float term, h;
          mixture_terms(L, lq, lp, q, pt, term, h);
          acc.x += term;
          acc.y += weighted(q, h);
          grad_kd = weighted(q, h - total_d);
        }
      }
      g[i] = kd_coef * grad_kd;
      if (ce_stats != kCeNone) {
        const float ce_prob = ce_probability(ce_stats, q, s[i], 0.0f, squared_ce, log2_z_c);
        g[i] += ce.soft * ce_prob - (col + i == lab.label ? ce.label : 0.0f) - ce.uniform;
      }
      if (smooth) s_sum += s[i];
      if (PHASE == kPhaseSums) q_log2_q += weighted(q, lq);  // a logit of -inf adds 0
    }
    if (p.g) store_block(p.g, col, g);
  });
  if (PHASE == kPhaseSums) {
    const float2 sums = block_sum2<kThreads>(acc, sum_scratch);
    // label smoothing's sum of s and the entropy's sum, in one reduction
    const float2 more = block_sum2<kThreads>(make_float2(s_sum, q_log2_q), sum_scratch);
    if (threadIdx.x == 0) {
      float* out = a.out + row * kStatColumns;
      out[0] = sums.x;
      out[1] = MODE == kModeReverseKL ? sums.x : sums.y;
      out[2] = ce_target(a, lab.column >= 0, s_label, 0.0f, smooth ? more.x : 0.0f);  // this shard's share
      out[3] = MODE != kModeCeOnly || a.has_ce ? kLn2 * more.y : 0.0f;
    }
  }
}

}  // namespace kdfast_cuda
