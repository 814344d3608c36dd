// The gradient pass of the CPU kernels: (kd_scale / T) * dL/da plus the CE family's soft * softmax(s) - label *
// onehot(label) - uniform (kernel_abi.h, CeCoefficients), times the reduction's scale, from the exps pass 1 kept in
// scratch. Runtime (kd source, ce source) pairs become one
// branch-free loop instantiation each.
#pragma once

#include "row_math.h"

namespace kdfast_cpu {

// Where the gradient pass finds the KD part of dL/da_j: q - p from the exps (forward KL), q (c_j - D) from the
// logits (reverse KL), q (d_j - D) from pass 2's scores (mixtures), or q * rest_factor (a sparse teacher's columns
// outside its ids, which its kernel then overwrites at the ids).
enum KdSource : int { kNoKd = 0, kKdFromExps = 1, kKdFromLogits = 2, kKdFromScores = 3, kKdFromRestFactor = 4 };

struct GradientTerms {
  const float* s;
  const float* t;
  const float* scores;
  float row_sum;  // D
  float kd_coef;
  CeCoefficients ce;  // the CE family's coefficients (kernel_abi.h)
  float rest_factor = 0.0f;  // kKdFromRestFactor
};

template <int kKd, int kCe, typename GradT>
void write_gradient_loop(GradT* g, const GradientTerms& terms, int64_t label, const RowStats& st, const Scratch& w,
                         const DistillArgs& a) {
  const float* es = w.exp_student.data();
  const float* et = w.exp_teacher.data();
  const float* ec = w.exp_ce.data();
  const float inv_t = a.inv_temperature, rs = st.ref_s, tr = st.t_at_ref, big_d = terms.row_sum;
  for_lanes(a.vocab, [&](int64_t j, auto zero) {
    using F = decltype(zero);
    F kd_part = zero;
    if constexpr (kKd == kKdFromExps) kd_part = load<F>(es + j) * st.inv_z_s - load<F>(et + j) * st.inv_z_t;
    if constexpr (kKd == kKdFromLogits) {
      const F c = ((load<F>(terms.s + j) - rs) - (load<F>(terms.t + j) - tr)) * inv_t;
      kd_part = weighted(load<F>(es + j) * st.inv_z_s, c - big_d);
    }
    if constexpr (kKd == kKdFromScores) {
      kd_part = weighted(load<F>(es + j) * st.inv_z_s, load<F>(terms.scores + j) - big_d);
    }
    if constexpr (kKd == kKdFromRestFactor) kd_part = weighted(load<F>(es + j) * st.inv_z_s, splat<F>(terms.rest_factor));
    F ce_part = zero;
    if constexpr (kCe == kCeFromTempered) ce_part = load<F>(es + j) * st.inv_z_ce;
    if constexpr (kCe == kCeFromTemperedSquared) ce_part = load<F>(es + j) * load<F>(es + j) * st.inv_z_ce;
    if constexpr (kCe == kCeFromOwnExps) ce_part = load<F>(ec + j) * st.inv_z_ce;
    if constexpr (kCe == kNoCe) {
      store_grad(g + j, terms.kd_coef * kd_part);
    } else {
      store_grad_with_label(g, j, terms.kd_coef * kd_part + terms.ce.soft * ce_part - terms.ce.uniform, label,
                            terms.ce.label);
    }
  });
}

// Turns the runtime (kd source, ce source) pair into one branch-free loop instantiation.
template <int kCe, typename GradT>
void write_gradient_ce(GradT* g, KdSource kd_source, const GradientTerms& terms, int64_t label, const RowStats& st,
                       const Scratch& w, const DistillArgs& a) {
  switch (kd_source) {
    case kNoKd: return write_gradient_loop<kNoKd, kCe>(g, terms, label, st, w, a);
    case kKdFromExps: return write_gradient_loop<kKdFromExps, kCe>(g, terms, label, st, w, a);
    case kKdFromLogits: return write_gradient_loop<kKdFromLogits, kCe>(g, terms, label, st, w, a);
    case kKdFromScores: return write_gradient_loop<kKdFromScores, kCe>(g, terms, label, st, w, a);
    case kKdFromRestFactor: return write_gradient_loop<kKdFromRestFactor, kCe>(g, terms, label, st, w, a);
  }
}

template <typename GradT>
void write_gradient(GradT* g, KdSource kd_source, const GradientTerms& terms, int64_t local_label,
                    const DistillArgs& a, const RowStats& st, const Scratch& w) {
  CeSource ce_source = kNoCe;
  if (a.has_ce) {
    ce_source = !a.has_kd ? kCeFromOwnExps
                : a.temperature_power == 1 ? kCeFromTempered
                : a.temperature_power == 2 ? kCeFromTemperedSquared
                                           : kCeFromOwnExps;
  }
  // The label's -label * onehot(label) is added inside the loop, before the entry's rounding (store_grad_with_label).
  switch (ce_source) {
    case kNoCe: write_gradient_ce<kNoCe>(g, kd_source, terms, -1, st, w, a); break;
    case kCeFromTempered: write_gradient_ce<kCeFromTempered>(g, kd_source, terms, local_label, st, w, a); break;
    case kCeFromTemperedSquared:
      write_gradient_ce<kCeFromTemperedSquared>(g, kd_source, terms, local_label, st, w, a);
      break;
    case kCeFromOwnExps: write_gradient_ce<kCeFromOwnExps>(g, kd_source, terms, local_label, st, w, a); break;
  }
}

}  // namespace kdfast_cpu
