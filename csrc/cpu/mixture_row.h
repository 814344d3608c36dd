// A teacher kind for the CPU row kernel: several teachers' rows mixed into one (docs/DESIGN.md, "Several teachers").
// Per row, in scratch that stays in L2, before the kernel's own passes:
//   per teacher  its exps e_j = exp((t_j - max) / T) (centred before the temperature divides: |t| / T may be ~1e4,
//                and t / T - max / T would round every log-probability by that much) and their sum z; its share
//                (w_m / z_m) e_j joins p_bar in the next teacher's pass. Each pass also takes the max of the row read
//                next (the next teacher's, the last one the student's), so every row streams in from memory once,
//                during a pass that computes exps (measured on a Zen 3, 1 thread: the separate max passes were 17% of
//                the mixing, the separate mixing passes 8%).
//   once         the last share, then the teacher row T * log p_bar_j: one log and no exp per column. Where p_bar_j
//                is below float32's normal range (every teacher's entry underflowed) the log-sum-exp of
//                log w_m - log z_m + (t - max) / T is taken instead, never the log of an underflowed sum (-inf there
//                would make reverse KL infinite).
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
// (JSD: an exp and a log per column and teacher), in place of a forward pass of the loss kernel per teacher. These
// passes keep the plain order (a max pass, an exp pass, a mixing pass per teacher).
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

// How a teacher's pass of the plain mixture adds the previous teacher's share into the mixture row: not at all (the
// first teacher), as its first share, or onto the shares before it.
enum MixStep : int { kMixNone = 0, kMixFirst = 1, kMixAdd = 2 };

// A teacher's exps not yet added into the mixture row: exps * factor (factor = w_m / z_m) joins it in the next pass.
struct PendingShare {
  const float* exps = nullptr;
  float factor = 0.0f;
};

// One teacher's pass of the plain mixture: its exps e_j = exp((t_j - top) / T) into `exps` (returns their sum), and
// beside them the max of the row read next (`next`) and the pending share of the teacher before it. The exps leave
// the core's time to the memory reads: each row streams in once, during a pass that computes.
template <bool kNextMax, int kStep>
float streamed_teacher_pass(const float* t, float top, const DistillArgs& a, float* exps, const float* next,
                            RunningMax& next_max, const PendingShare& pending, float* mixed) {
  const float inv_t = a.inv_temperature;
  VFloat z{};
  for_lanes(a.vocab, [&](int64_t j, auto zero) {
    using F = decltype(zero);
    const F e = fast_exp_centred((load<F>(t + j) - top) * inv_t);
    store(exps + j, e);
    accumulate(z, e);
    if constexpr (kNextMax) next_max.add(load<F>(next + j));
    if constexpr (kStep == kMixFirst) store(mixed + j, load<F>(pending.exps + j) * pending.factor);
    if constexpr (kStep == kMixAdd) store(mixed + j, load<F>(mixed + j) + load<F>(pending.exps + j) * pending.factor);
  });
  return horizontal_sum(z);
}

template <bool kNextMax>
float streamed_teacher_pass(int step, const float* t, float top, const DistillArgs& a, float* exps, const float* next,
                            RunningMax& next_max, const PendingShare& pending, float* mixed) {
  switch (step) {
    case kMixFirst: return streamed_teacher_pass<kNextMax, kMixFirst>(t, top, a, exps, next, next_max, pending, mixed);
    case kMixAdd: return streamed_teacher_pass<kNextMax, kMixAdd>(t, top, a, exps, next, next_max, pending, mixed);
    default: return streamed_teacher_pass<kNextMax, kMixNone>(t, top, a, exps, next, next_max, pending, mixed);
  }
}

// The plain mixture (no teacher's own divergence wanted): one pass per teacher that counts, each also taking the max
// of the next row (the next teacher's float32 row, else the student's: w.mix_student_max) and adding the previous
// teacher's share, the two exps rows alternating; no pass only reads a row for its max or only mixes. Returns the
// step the last share needs (kMixNone: no teacher counts) with that share in `pending`.
template <typename TeacherT>
int mix_streamed(const TeacherT* const* rows, int64_t count, const float* log_weights, const DistillArgs& a,
                 Scratch& w, const float* student, float* maxima, float* offsets, PendingShare& pending) {
  float* mixed = w.exp_teacher.data();
  float* buffers[2] = {w.mix_exps.data(), w.mix_exps_previous.data()};
  int step = kMixNone, parity = 0;
  int64_t known_index = -1;  // the teacher whose max the last pass took
  float known_max = 0.0f;
  bool student_max_known = false;
  for (int64_t m = 0; m < count; ++m) {
    maxima[m] = -INFINITY;
    offsets[m] = -INFINITY;
    w.mix_own_kl[m] = std::numeric_limits<float>::quiet_NaN();
    if (log_weights[m] == -INFINITY) continue;  // a zero weight: the teacher adds nothing
    const float* t = widen_row(rows[m], a.vocab, w.mix_widened);
    const float top = known_index == m ? known_max : row_max(t, a.vocab);
    maxima[m] = top;
    if (!std::isfinite(top)) continue;  // a row of -inf (no mass)
    int64_t next = m + 1;
    while (next < count && log_weights[next] == -INFINITY) ++next;
    const float* next_row = student;
    if (next < count) {
      if constexpr (std::is_same_v<TeacherT, float>) {
        next_row = rows[next];
      } else {
        next_row = nullptr;  // a 16-bit row is widened first, its max taken there
      }
    }
    RunningMax next_max;
    float* exps = buffers[parity];
    const float z = next_row != nullptr
                        ? streamed_teacher_pass<true>(step, t, top, a, exps, next_row, next_max, pending, mixed)
                        : streamed_teacher_pass<false>(step, t, top, a, exps, next_row, next_max, pending, mixed);
    if (next_row != nullptr && next < count) known_index = next, known_max = next_max.value();
    if (next_row == student) student_max_known = true, w.mix_student_max = next_max.value();
    step = step == kMixNone ? kMixFirst : kMixAdd;
    offsets[m] = log_weights[m] - std::log(z);
    pending = {exps, std::exp(log_weights[m]) / z};
    parity ^= 1;
  }
  if (!student_max_known) w.mix_student_max = row_max(student, a.vocab);
  return step;
}

// The mixture with each teacher's own divergence (DistillArgs::mix_divergences): a teacher's exps, its own divergence
// and its share, pass by pass; teachers of weight 0 take their exps too. Returns whether any teacher counts.
template <typename TeacherT>
bool mix_with_own_divergences(const TeacherT* const* rows, int64_t count, const float* log_weights,
                              const DistillArgs& a, Scratch& w, const float* student, float* maxima, float* offsets) {
  const int64_t vocab = a.vocab;
  const float inv_t = a.inv_temperature;
  float* mixed = w.exp_teacher.data();
  float* exps = w.mix_exps.data();
  const bool own_reverse = a.divergence == kReverseKL;
  const bool own_other = a.divergence != kForwardKL && !own_reverse;  // per column terms, after each sum
  const float student_top = row_max(student, vocab);
  w.mix_student_max = student_top;
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
    const bool counts = std::isfinite(top) && log_weights[m] != -INFINITY;
    if (!std::isfinite(top)) continue;
    VFloat sum_acc{}, own_acc{};
    for_lanes(vocab, [&](int64_t j, auto zero) {
      using F = decltype(zero);
      const F dt = (load<F>(t + j) - top) * inv_t;
      const F value = fast_exp(dt);
      if (counts || own_other) store(exps + j, value);
      accumulate(sum_acc, value);
      if (!own_other) {
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
    } else {
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
  return !first;
}

// The last pass: the pending share joins the mixture row p_bar (kStep as the teacher passes), and the teacher row
// T * log p_bar is written.
template <int kStep, typename TeacherT>
void finish_mixture(const TeacherT* const* rows, int64_t count, const float* maxima, const float* offsets,
                    const PendingShare& pending, const DistillArgs& a, Scratch& w) {
  float* mixed = w.exp_teacher.data();
  float* out = w.teacher.data();
  const float temperature = a.temperature, inv_t = a.inv_temperature;
  // Whether any column fell below kSmallestMixture: OR-ed lane by lane, looked at once after the loop (a test per
  // lane and column was a fifth of this pass).
  VInt any_small{};
  for_lanes(a.vocab, [&](int64_t j, auto zero) {
    using F = decltype(zero);
    F total;
    if constexpr (kStep == kMixNone) total = load<F>(mixed + j);
    if constexpr (kStep == kMixFirst) total = load<F>(pending.exps + j) * pending.factor;
    if constexpr (kStep == kMixAdd) total = load<F>(mixed + j) + load<F>(pending.exps + j) * pending.factor;
    if constexpr (kStep != kMixNone) store(mixed + j, total);
    const auto small = total < kSmallestMixture;
    if constexpr (std::is_same_v<F, VFloat>) {
      any_small |= small;
    } else {
      any_small[0] |= small;
    }
    // fast_log_ge1 holds below 1 too for normal x (measured: 4e-6 absolute over [1e-30, 1]); no division.
    store(out + j, fast_log_ge1(small ? splat<F>(1.0f) : total) * temperature);
  });
  if (!any_lane(any_small)) return;
  for (int64_t j = 0; j < a.vocab; ++j) {  // the rare columns where every teacher underflowed
    if (mixed[j] < kSmallestMixture) out[j] = exact_log_mixture(rows, maxima, offsets, count, j, inv_t) * temperature;
  }
}

// Writes the mixture of `count` teacher rows with log-weights `log_weights` (-inf: the teacher does not count) into
// w.teacher (T * log p_bar, the kernel's teacher logits) and w.exp_teacher (p_bar), and the student row's max into
// w.mix_student_max; returns w.teacher. With `own`, each teacher's forward KL but log z_s into w.mix_own_kl (NaN for
// a teacher row without a finite max); under the other divergences the whole value.
template <typename TeacherT>
const float* mixture_row(const TeacherT* const* rows, int64_t count, const float* log_weights, const DistillArgs& a,
                         Scratch& w, const float* student, bool own) {
  float maxima[kMaxMixedTeachers], offsets[kMaxMixedTeachers];
  PendingShare pending;
  int step = kMixNone;
  bool any = true;
  if (own) {
    any = mix_with_own_divergences(rows, count, log_weights, a, w, student, maxima, offsets);
  } else {
    step = mix_streamed(rows, count, log_weights, a, w, student, maxima, offsets, pending);
    any = step != kMixNone;
  }
  float* out = w.teacher.data();
  if (!any) {  // no teacher counts in this row: no mass anywhere, as a teacher row of -inf
    for (int64_t j = 0; j < a.vocab; ++j) w.exp_teacher[j] = 0.0f, out[j] = -INFINITY;
    return out;
  }
  // The last teacher's share is still pending after its pass (the first alone: its whole mixture).
  if (step == kMixFirst) {
    finish_mixture<kMixFirst>(rows, count, maxima, offsets, pending, a, w);
  } else if (step == kMixAdd) {
    finish_mixture<kMixAdd>(rows, count, maxima, offsets, pending, a, w);
  } else {
    finish_mixture<kMixNone>(rows, count, maxima, offsets, pending, a, w);
  }
  return out;
}

}  // namespace kdfast_cpu
