// A teacher kind for the CPU row kernel: several teachers' rows mixed into one (docs/DESIGN.md, "Several teachers").
// Per row, in scratch that stays in L2, before the kernel's own passes:
//   per teacher  its max, its exps e_j = exp((t_j - max) / T) (centred before the temperature divides: |t| / T may
//                be ~1e4, and t / T - max / T would round every log-probability by that much) and their sum z, then
//                p_bar_j += (w_m / z_m) e_j into the teacher-exp row
//   once         the teacher row T * log p_bar_j: one log and no exp per column. Where p_bar_j is below float32's
//                normal range (every teacher's entry underflowed) the log-sum-exp of log w_m - log z_m + (t - max) / T
//                is taken instead, never the log of an underflowed sum (-inf there would make reverse KL infinite).
// The kernel then reads p_bar as its teacher exps against the reference 0 (log p_bar <= 0): a mixture costs M exps and
// one log per column beside the student's exp, and no [rows, V] mixture is written to memory and read back.
// Each teacher's own forward KL (DistillArgs::mix_divergences, for the trainers' per-teacher logs) comes from the same
// exps: KL(p_m || q) = sum_j e_j (dt_j - ds_j) / z_m - log z_m + log z_s, with dt and ds centred on each row's max (as
// the kernel's own forward KL), so it costs two FMAs per column and teacher and no pass of its own; teachers of weight
// 0 in the row then take their exps too (they are not mixed). log z_s is added by the kernel once its exp pass has it.
// Each one's reverse KL (TRL's DistillationConfig default, beta 1) weighs by the student's q instead: KL(q || p_m) =
// sum_j e_sj (ds_j - dt_j) / z_s - log z_s + log z_m, from the student's exps taken once before the teachers (one exp
// per column; the kernel's exp pass takes them again) and the teachers' own; the value is whole when written. Under
// the other divergences (JSD, the skews, TVD: GKD's default is JSD) each teacher's own value takes one more sweep of
// that teacher's row once its sum is known, the kernel's mixture_term_and_score at each column from the same exps
// (JSD: an exp and a log per column and teacher), in place of a forward pass of the loss kernel per teacher.
#pragma once

#include <cmath>
#include <limits>

#include "row_math.h"

namespace kdfast_cpu {

// Below this a mixture's probability is recomputed as a log-sum-exp (the fast log takes normal floats only).
constexpr float kSmallestMixture = 1e-30f;

// The exact log p_bar at column j from the teachers' raw rows: the rare columns where every teacher underflowed.
template <typename TeacherT>
float exact_log_mixture(const TeacherT* const* rows, const float* maxima, const float* offsets, int64_t count,
                        int64_t j, float inv_t) {
  float terms[kMaxMixedTeachers];
  float hi = -INFINITY;
  for (int64_t m = 0; m < count; ++m) {
    terms[m] = offsets[m] == -INFINITY ? -INFINITY : (to_float(rows[m][j]) - maxima[m]) * inv_t + offsets[m];
    hi = terms[m] > hi ? terms[m] : hi;
  }
  if (hi == -INFINITY) return hi;  // no teacher has mass here: -inf, not NaN
  float total = 0.0f;
  for (int64_t m = 0; m < count; ++m) total += std::exp(terms[m] - hi);
  return hi + std::log(total);
}

// One teacher's own divergence (JSD, a skew or TVD) against the student, summed over the row from both sides' exps
// (e_t = exp((t - top) / T) in `exps`, z its sum; the student's the same way), the kernel's own terms at each column.
inline float own_divergence_sweep(const float* t, float top, const float* exps, float z, const float* student,
                                  float student_top, const float* student_exps, float log_z_s, float inv_z_s,
                                  const DistillArgs& a) {
  const MixtureConstants mc(a.beta);
  const float inv_t = a.inv_temperature, log_z = std::log(z), inv_z = 1.0f / z;
  VFloat total{};
  for_lanes(a.vocab, [&](int64_t j, auto zero) {
    using F = decltype(zero);
    const F ls = (load<F>(student + j) - student_top) * inv_t - log_z_s;
    const F lt = (load<F>(t + j) - top) * inv_t - log_z;
    F term, h;
    mixture_term_and_score<F>(a.divergence, mc.beta, mc.log_beta, mc.log_1m_beta, ls, lt,
                              load<F>(student_exps + j) * inv_z_s, load<F>(exps + j) * inv_z, term, h);
    accumulate(total, term);
  });
  return horizontal_sum(total);
}

// Writes the mixture of `count` teacher rows with log-weights `log_weights` (-inf: the teacher does not count) into
// w.teacher (T * log p_bar, the kernel's teacher logits) and w.exp_teacher (p_bar); returns w.teacher. With the
// student's row `student` (else null), each teacher's forward KL but log z_s into w.mix_own_kl (NaN for a teacher row
// without a finite max); under the other divergences the whole value.
template <typename TeacherT>
const float* mixture_row(const TeacherT* const* rows, int64_t count, const float* log_weights, const DistillArgs& a,
                         Scratch& w, const float* student) {
  const int64_t vocab = a.vocab;
  const float inv_t = a.inv_temperature;
  float* mixed = w.exp_teacher.data();
  float* exps = w.mix_exps.data();
  float maxima[kMaxMixedTeachers], offsets[kMaxMixedTeachers];
  const bool own = student != nullptr;
  const bool own_reverse = own && a.divergence == kReverseKL;
  const bool own_other = own && a.divergence != kForwardKL && !own_reverse;  // per column terms, after each sum
  const float student_top = own ? row_max(student, vocab) : 0.0f;
  float* student_exps = w.exp_student.data();  // the kernel's exp pass writes the same values later
  float log_z_s = 0.0f, inv_z_s = 0.0f;
  if (own_reverse || own_other) {
    VFloat z_acc{};
    for_lanes(vocab, [&](int64_t j, auto zero) {
      using F = decltype(zero);
      const F e = fast_exp((load<F>(student + j) - student_top) * inv_t);
      store(student_exps + j, e);
      accumulate(z_acc, e);
    });
    const float z_s = horizontal_sum(z_acc);
    log_z_s = std::log(z_s);
    inv_z_s = 1.0f / z_s;
  }
  bool first = true;
  for (int64_t m = 0; m < count; ++m) {
    const float* t = widen_row(rows[m], vocab, w.mix_widened);
    const float top = row_max(t, vocab);
    maxima[m] = top;
    offsets[m] = -INFINITY;
    w.mix_own_kl[m] = std::numeric_limits<float>::quiet_NaN();
    // A row of -inf (no mass) or a zero weight: the teacher adds nothing (but its own divergence, when wanted).
    const bool counts = std::isfinite(top) && log_weights[m] != -INFINITY;
    if (!std::isfinite(top) || (!counts && !own)) continue;
    VFloat sum_acc{}, own_acc{};
    for_lanes(vocab, [&](int64_t j, auto zero) {
      using F = decltype(zero);
      const F dt = (load<F>(t + j) - top) * inv_t;
      const F value = fast_exp(dt);
      if (counts || own_other) store(exps + j, value);
      accumulate(sum_acc, value);
      if (own && !own_other) {
        const F ds = (load<F>(student + j) - student_top) * inv_t;
        if (own_reverse) {
          accumulate(own_acc, weighted(load<F>(student_exps + j), ds - dt));
        } else {
          accumulate(own_acc, weighted(value, dt - ds));
        }
      }
    });
    const float sum = horizontal_sum(sum_acc);
    if (own_other) {
      w.mix_own_kl[m] = own_divergence_sweep(t, top, exps, sum, student, student_top, student_exps, log_z_s, inv_z_s,
                                             a);
    } else if (own_reverse) {
      w.mix_own_kl[m] = horizontal_sum(own_acc) * inv_z_s - log_z_s + std::log(sum);
    } else if (own) {
      w.mix_own_kl[m] = horizontal_sum(own_acc) / sum - std::log(sum);
    }
    if (!counts) continue;
    offsets[m] = log_weights[m] - std::log(sum);
    const float factor = std::exp(log_weights[m]) / sum;
    for_lanes(vocab, [&](int64_t j, auto zero) {
      using F = decltype(zero);
      const F share = load<F>(exps + j) * factor;
      store(mixed + j, first ? share : load<F>(mixed + j) + share);
    });
    first = false;
  }
  float* out = w.teacher.data();
  if (first) {  // no teacher counts in this row: no mass anywhere, as a teacher row of -inf
    for (int64_t j = 0; j < vocab; ++j) mixed[j] = 0.0f, out[j] = -INFINITY;
    return out;
  }
  const float temperature = a.temperature;
  for_lanes(vocab, [&](int64_t j, auto zero) {
    using F = decltype(zero);
    const F total = load<F>(mixed + j);
    const auto small = total < kSmallestMixture;
    // fast_log_ge1 holds below 1 too for normal x (measured: 4e-6 absolute over [1e-30, 1]); no division.
    F log_mixed = fast_log_ge1(small ? splat<F>(1.0f) : total);
    if constexpr (std::is_same_v<F, VFloat>) {
      for (int lane = 0; lane < kLanes; ++lane) {
        if (small[lane]) log_mixed[lane] = exact_log_mixture(rows, maxima, offsets, count, j + lane, inv_t);
      }
    } else if (small) {
      log_mixed = exact_log_mixture(rows, maxima, offsets, count, j, inv_t);
    }
    store(out + j, log_mixed * temperature);
  });
  return out;
}

}  // namespace kdfast_cpu
