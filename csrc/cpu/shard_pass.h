// A vocab shard's SUMS and GRADIENT phases on the CPU (docs/DESIGN.md, "Shards and phases"): one pass over the
// row from the global log-sum-exps. Its probabilities are final as soon as they are computed, so the divergence's
// sums and the gradient come out of the same loop, with nothing kept between passes. Log-probabilities are
// (x - T lse) / T; the centring on a reference entry needs the row's argmax, which no shard knows: D is then the
// plain sum of q * h over the vocabulary (the GRADIENT phase takes it from row_totals). SUMS also adds up
// sum_j q_j log q_j for the student's entropy: q at T from the global lse with a divergence, at T = 1 for CE alone.
#pragma once

#include "row_math.h"

namespace kdfast_cpu {

enum ShardKd : int { kShardNoKd = 0, kShardForwardKL = 1, kShardReverseKL = 2, kShardMixture = 3 };

struct ShardSums {
  float kd;  // the divergence's terms over these columns
  float d;   // D: the gradient's row sum over these columns (reverse KL: the same as kd)
  float q_log_q;  // sum_j q_j log q_j over these columns (0 without a divergence or CE)
};

struct ShardRow {
  // T lse_s, T lse_t (logit units), lse_c; for CE alone ref_s is lse_c and inv_t_s 1: q is then CE's softmax
  float ref_s, ref_t, ref_ce, inv_t_s;
  float inv_z_ce;              // softmax(s) at T = 1 from the tempered probabilities: q * this (T = 1), q^2 * this
  float total_d;               // GRADIENT: the global D
  float kd_coef;
  CeCoefficients ce;
};

template <int kKd, int kCe, typename GradT>
ShardSums shard_loop(const float* s, const float* t, GradT* g, int64_t label, const ShardRow& r,
                     const DistillArgs& a) {
  const float inv_t = a.inv_temperature;
  const MixtureConstants mc(a.beta, a.one_minus_beta);
  const int divergence = a.divergence;
  LaneSum kd_acc{}, d_acc{}, entropy_acc{};
  // SUMS alone reports it; without a divergence or CE no student statistics were given
  const bool want_entropy = a.phase == kPhaseSums && (a.has_kd || a.has_ce);
  for_lanes(a.vocab, [&](int64_t j, auto zero) {
    using F = decltype(zero);
    const F sj = load<F>(s + j);
    const F ls = (sj - r.ref_s) * r.inv_t_s;  // log q_j
    const F q = fast_exp_centred(ls);
    if (want_entropy) accumulate_weighted(entropy_acc, q, ls);
    F grad_kd = zero;
    if constexpr (kKd != kShardNoKd) {
      const F lt = (load<F>(t + j) - r.ref_t) * inv_t;
      const F p = fast_exp_centred(lt);
      if constexpr (kKd == kShardForwardKL) {
        accumulate_weighted(kd_acc, p, lt - ls);
        grad_kd = q - p;
      }
      if constexpr (kKd == kShardReverseKL) {
        const F c = ls - lt;
        accumulate_weighted(kd_acc, q, c);
        grad_kd = weighted(q, c - r.total_d);
      }
      if constexpr (kKd == kShardMixture) {
        F term, h;
        mixture_term_and_score<F>(divergence, mc, ls, lt, q, p, term, h);
        accumulate(kd_acc, term);
        accumulate_weighted(d_acc, q, h);
        grad_kd = weighted(q, h - r.total_d);
      }
    }
    if (g != nullptr) {
      F ce = zero;
      if constexpr (kCe == kCeFromTempered) ce = q * r.inv_z_ce;
      if constexpr (kCe == kCeFromTemperedSquared) ce = q * q * r.inv_z_ce;
      // CE alone: q is already its softmax (ref_s = lse_c at T = 1)
      if constexpr (kCe == kCeFromOwnExps) ce = kKd == kShardNoKd ? q : fast_exp_centred(sj - r.ref_ce);
      if constexpr (kCe == kNoCe) {
        store_grad(g + j, r.kd_coef * grad_kd);
      } else {
        store_grad_with_label(g, j, r.kd_coef * grad_kd + r.ce.soft * ce - r.ce.uniform, label, r.ce.label);
      }
    }
  });
  const float kd = horizontal_sum(kd_acc);
  return {kd, kKd == kShardReverseKL ? kd : horizontal_sum(d_acc), horizontal_sum(entropy_acc)};
}

template <int kCe, typename GradT>
ShardSums shard_loop_ce(ShardKd kd, const float* s, const float* t, GradT* g, int64_t label, const ShardRow& r,
                        const DistillArgs& a) {
  switch (kd) {
    case kShardNoKd: return shard_loop<kShardNoKd, kCe>(s, t, g, label, r, a);
    case kShardForwardKL: return shard_loop<kShardForwardKL, kCe>(s, t, g, label, r, a);
    case kShardReverseKL: return shard_loop<kShardReverseKL, kCe>(s, t, g, label, r, a);
    default: return shard_loop<kShardMixture, kCe>(s, t, g, label, r, a);
  }
}

// One row of SUMS or GRADIENT. local_label: the label's column here, or -1 when another rank holds it.
template <typename GradT>
ShardSums shard_row(const float* s, const float* t, GradT* g, int64_t row, float row_scale, int64_t local_label,
                    const DistillArgs& a) {
  const float* lse = a.row_stats + row * kStatColumns;
  ShardRow r{};
  r.ref_s = a.has_kd ? lse[0] * a.temperature : lse[2];
  r.inv_t_s = a.has_kd ? a.inv_temperature : 1.0f;
  r.ref_t = lse[1] * a.temperature;
  r.ref_ce = lse[2];
  r.total_d = a.phase == kPhaseGradient ? a.row_totals[row * kStatColumns + 1] : 0.0f;
  r.kd_coef = row_scale * a.kd_scale * a.inv_temperature;
  r.ce = ce_coefficients(a, row_scale, lse[2]);
  const ShardKd kd = !a.has_kd ? kShardNoKd
                     : a.divergence == kForwardKL ? kShardForwardKL
                     : a.divergence == kReverseKL ? kShardReverseKL
                                                  : kShardMixture;
  CeSource ce = kNoCe;
  if (a.has_ce && g != nullptr) {
    ce = !a.has_kd ? kCeFromOwnExps
         : a.temperature_power == 1 ? kCeFromTempered
         : a.temperature_power == 2 ? kCeFromTemperedSquared
                                    : kCeFromOwnExps;
    // exp(s - lse_c) = q (T = 1) or q^2 (T = 2) times exp(power * lse_s - lse_c).
    if (ce != kCeFromOwnExps) r.inv_z_ce = std::exp(a.temperature_power * lse[0] - lse[2]);
  }
  ShardSums sums{};
  // The label's -label * onehot(label) is added inside the loop, before the entry's rounding (store_grad_with_label).
  switch (ce) {
    case kNoCe: sums = shard_loop_ce<kNoCe>(kd, s, t, g, -1, r, a); break;
    case kCeFromTempered: sums = shard_loop_ce<kCeFromTempered>(kd, s, t, g, local_label, r, a); break;
    case kCeFromTemperedSquared: sums = shard_loop_ce<kCeFromTemperedSquared>(kd, s, t, g, local_label, r, a); break;
    case kCeFromOwnExps: sums = shard_loop_ce<kCeFromOwnExps>(kd, s, t, g, local_label, r, a); break;
  }
  return sums;
}

}  // namespace kdfast_cpu
