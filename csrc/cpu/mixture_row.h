// A teacher kind for the CPU row kernel: several teachers' rows mixed into one (docs/DESIGN.md, "Several teachers").
// Per row, in scratch that stays in L2, before the kernel's own passes:
//   per teacher  its exps e_j = exp((t_j - max) / T) (centred before the temperature divides: |t| / T may be ~1e4,
//                and t / T - max / T would round every log-probability by that much) and their sum z, in a ring of
//                kMixPendingShares + 1 rows; its share (w_m / z_m) e_j stays pending there. Only when a fourth share
//                would be pending does a pass add the oldest one into p_bar's row beside its exps. Each pass also takes
//                the max of the row read next (the next teacher's, the last one the student's), so every row streams
//                in from memory once, during a pass that computes exps (measured on a Zen 3, 1 thread: the separate
//                max passes were 17% of the mixing, the separate mixing passes 8%).
//   once         p_bar = the mixture row (when shares were added into it) + the pending shares, then the teacher row
//                T * log p_bar_j: one log and no exp per column. Up to three teachers no pass writes p_bar's row
//                before this one (on an Intel Xeon, M = 3: the passes that added a share into it, writing a fresh
//                row, took 17% of the kernel's samples; 2026-12-05). Where p_bar_j
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
// (JSD: an exp and a log per column and teacher), in place of a forward pass of the loss kernel per teacher. The own
// sums ride on the teachers' passes; the student's max (and for reverse KL and the others its exps) come first.
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
// (flatten: the per-column terms inlined; noinline: the teachers' pass loop stays as small as forward KL needs it)
__attribute__((noinline, flatten)) inline float own_divergence_sweep(const float* t, float top, const float* exps,
                                                                     float z, const float* student, float student_top,
                                                                     const float* student_exps, float log_z_s,
                                                                     float inv_z_s, const DistillArgs& a) {
  const MixtureConstants mc(a.beta, a.one_minus_beta);
  const float inv_t = a.inv_temperature, log_z = std::log(z), inv_z = 1.0f / z;
  LaneSum total{};
  for_lanes(a.vocab, [&](int64_t j, auto zero) {
    using F = decltype(zero);
    const F ls = (load<F>(student + j) - student_top) * inv_t - log_z_s;
    const F lt = (load<F>(t + j) - top) * inv_t - log_z;
    F term, h;
    mixture_term_and_score<F>(a.divergence, mc, ls, lt,
                              load<F>(student_exps + j) * inv_z_s, load<F>(exps + j) * inv_z, term, h);
    accumulate(total, term);
  });
  return horizontal_sum(total);
}

// How a teacher's pass adds the oldest pending share into the mixture row: not at all, as the row's first share, or
// onto the shares before it.
enum MixStep : int { kMixNone = 0, kMixFirst = 1, kMixAdd = 2 };

// Which teacher's own divergence a pass sums beside its exps (DistillArgs::mix_divergences): none, forward KL, reverse
// KL, or another divergence (a sweep after the pass, from the exps it stored).
enum OwnDivergence : int { kOwnNone = 0, kOwnForward = 1, kOwnReverse = 2, kOwnOther = 3 };

// A teacher's exps not yet added into the mixture row: exps * factor (factor = w_m / z_m).
struct PendingShare {
  const float* exps = nullptr;
  float factor = 0.0f;
};

// p_bar at column j from the last rows (kRows of them).
template <int kRows, typename F>
inline __attribute__((always_inline)) F mixture_total(const MixtureSum& sum, int64_t j) {
  F total = load<F>(sum.rows[0] + j) * sum.factors[0];
  if constexpr (kRows > 1) total = total + load<F>(sum.rows[1] + j) * sum.factors[1];
  if constexpr (kRows > 2) total = total + load<F>(sum.rows[2] + j) * sum.factors[2];
  if constexpr (kRows > 3) total = total + load<F>(sum.rows[3] + j) * sum.factors[3];
  return total;
}

// The student's row as the teachers' own divergences read it: its max, its exps and sum (reverse KL and the others).
struct StudentRow {
  const float* s;
  float top, log_z = 0.0f, inv_z = 0.0f;
  const float* exps = nullptr;
};

// One teacher's pass: its exps e_j = exp((t_j - top) / T) into `exps` (their sum into *z), and beside them the max of
// the row read next (`next`), the oldest pending share (`pending`, added into the mixture row with kStep) and, with
// kOwn, the sum its own divergence needs (returned). The exps leave the core's time to the memory reads: each row
// streams in once, during a pass that computes.
template <int kStep, int kOwn>
float teacher_pass(const float* t, float top, const DistillArgs& a, float* exps, float* z, const float* next,
                   RunningMax& next_max, const PendingShare& pending, float* mixed, const StudentRow& student) {
  const float inv_t = a.inv_temperature;
  // Locals, not the references' fields: a float store to the rows may alias those, so the compiler kept the running
  // max in memory (a store and a dependent load a vector) and reloaded the share's factor every vector.
  RunningMax ahead = next_max;
  const float* const share = pending.exps;
  const float factor = pending.factor;
  const float* const student_s = student.s;
  const float* const student_exps = student.exps;
  const float student_top = student.top;
  LaneSum z_acc{}, own_acc{};
  for_lanes(a.vocab, [&](int64_t j, auto zero) {
    using F = decltype(zero);
    const F dt = (load<F>(t + j) - top) * inv_t;
    const F e = fast_exp_centred(dt);
    store(exps + j, e);
    accumulate(z_acc, e);
    __builtin_prefetch(next + j + kPrefetchAhead, 0, 3);
    ahead.add(load<F>(next + j));
    if constexpr (kStep == kMixFirst) store(mixed + j, load<F>(share + j) * factor);
    if constexpr (kStep == kMixAdd) store(mixed + j, load<F>(mixed + j) + load<F>(share + j) * factor);
    if constexpr (kOwn == kOwnForward || kOwn == kOwnReverse) {
      const F ds = (load<F>(student_s + j) - student_top) * inv_t;
      if constexpr (kOwn == kOwnForward) accumulate_weighted(own_acc, e, dt - ds);
      if constexpr (kOwn == kOwnReverse) accumulate_weighted(own_acc, load<F>(student_exps + j), ds - dt);
    }
  });
  next_max = ahead;
  *z = horizontal_sum(z_acc);
  return horizontal_sum(own_acc);
}

template <int kOwn>
float teacher_pass_at_step(int step, const float* t, float top, const DistillArgs& a, float* exps, float* z,
                           const float* next, RunningMax& next_max, const PendingShare& pending, float* mixed,
                           const StudentRow& student) {
  switch (step) {
    case kMixFirst: return teacher_pass<kMixFirst, kOwn>(t, top, a, exps, z, next, next_max, pending, mixed, student);
    case kMixAdd: return teacher_pass<kMixAdd, kOwn>(t, top, a, exps, z, next, next_max, pending, mixed, student);
    default: return teacher_pass<kMixNone, kOwn>(t, top, a, exps, z, next, next_max, pending, mixed, student);
  }
}

// Turns the runtime (own divergence, step) pair into one branch-free loop instantiation.
inline float run_teacher_pass(int own, int step, const float* t, float top, const DistillArgs& a, float* exps,
                              float* z, const float* next, RunningMax& next_max, const PendingShare& pending,
                              float* mixed, const StudentRow& student) {
  switch (own) {
    case kOwnForward:
      return teacher_pass_at_step<kOwnForward>(step, t, top, a, exps, z, next, next_max, pending, mixed, student);
    case kOwnReverse:
      return teacher_pass_at_step<kOwnReverse>(step, t, top, a, exps, z, next, next_max, pending, mixed, student);
    case kOwnOther:
      return teacher_pass_at_step<kOwnOther>(step, t, top, a, exps, z, next, next_max, pending, mixed, student);
    default:
      return teacher_pass_at_step<kOwnNone>(step, t, top, a, exps, z, next, next_max, pending, mixed, student);
  }
}

// The student's max (and for reverse KL and the other divergences its exps, into w.exp_student, which the kernel's
// exp pass writes again later) before the teachers, when their own divergences are wanted; `carried`: the max the
// row before took (Scratch::next_row).
inline StudentRow student_for_own(const float* s, int own, const DistillArgs& a, Scratch& w, bool carried) {
  StudentRow student{s, carried ? w.next_student_max : row_max(s, a.vocab)};
  if (own != kOwnReverse && own != kOwnOther) return student;
  float* exps = w.exp_student.data();
  LaneSum z_acc{};
  for_lanes(a.vocab, [&](int64_t j, auto zero) {
    using F = decltype(zero);
    const F e = fast_exp_centred((load<F>(s + j) - student.top) * a.inv_temperature);
    store(exps + j, e);
    accumulate(z_acc, e);
  });
  const float z = horizontal_sum(z_acc);
  student.log_z = std::log(z);
  student.inv_z = 1.0f / z;
  student.exps = exps;
  return student;
}

// The mixture's teacher passes, one per teacher (with own divergences wanted, a teacher of weight 0 in the row takes
// its exps too, unmixed; else it is skipped). Each pass also takes the max of the next row it will read (the next
// teacher's float32 row; a 16-bit row is widened and its max taken there) and, when its teacher's share would be one
// pending share too many, adds the oldest into the mixture row. Returns the rows the mixture's last pass adds up in
// `last`, and whether any teacher counts.
template <typename TeacherT>
bool mix_teachers(const TeacherT* const* rows, int64_t count, const float* log_weights, int64_t row,
                  const DistillArgs& a, Scratch& w, const float* s, int own, float* maxima, float* offsets,
                  MixtureSum& last) {
  // The student's and the first teacher's maxima, when the row before took them beside its exps.
  const bool carried = w.next_row == row;
  float* mixed = w.exp_teacher.data();
  const StudentRow student = own != kOwnNone ? student_for_own(s, own, a, w, carried) : StudentRow{s, 0.0f};
  bool student_max_known = own != kOwnNone;
  if (student_max_known) w.mix_student_max = student.top;
  bool mixed_has_shares = false;
  MixtureSum pending;  // the shares not yet added into the mixture row, oldest first
  int64_t kept = 0;    // the shares kept so far: the next pass writes its exps into ring row kept % its size
  int64_t known_index = -1;  // the teacher whose max the last pass took
  float known_max = 0.0f;
  auto takes_a_pass = [&](int64_t m) { return own != kOwnNone || log_weights[m] != -INFINITY; };
  for (int64_t m = 0; m < count; ++m) {
    maxima[m] = -INFINITY;
    offsets[m] = -INFINITY;
    w.mix_own_kl[m] = std::numeric_limits<float>::quiet_NaN();
    if (!takes_a_pass(m)) continue;  // a zero weight: the teacher adds nothing
    const float* t = widen_row(rows[m], a.vocab, w.mix_widened);
    const float top = known_index == m ? known_max : m == 0 && carried ? w.next_teacher_max : row_max(t, a.vocab);
    maxima[m] = top;
    if (!std::isfinite(top)) continue;  // a row of -inf (no mass)
    int64_t next = m + 1;
    while (next < count && !takes_a_pass(next)) ++next;
    const float* next_row = s;  // after the last teacher, the student's row (its max, when not taken already)
    if (next < count) {
      if constexpr (std::is_same_v<TeacherT, float>) next_row = rows[next];
    }
    const bool counts = log_weights[m] != -INFINITY;
    // The oldest share joins the mixture row in this pass when this one's would be one too many pending. The ring
    // row this pass writes is never a pending share's: at most kMixPendingShares of its rows are.
    const bool adds_oldest = counts && pending.count == kMixPendingShares;
    const int step = !adds_oldest ? kMixNone : mixed_has_shares ? kMixAdd : kMixFirst;
    const PendingShare oldest{pending.rows[0], pending.factors[0]};
    RunningMax next_max;
    float* exps = w.mix_exps[kept % (kMixPendingShares + 1)].data();
    float z;
    const float own_sum = run_teacher_pass(own, step, t, top, a, exps, &z, next_row, next_max, oldest, mixed, student);
    if (next_row != s) known_index = next, known_max = next_max.value();
    if (next_row == s && !student_max_known) student_max_known = true, w.mix_student_max = next_max.value();
    if (adds_oldest) mixed_has_shares = true, pending.drop_first();
    if (own == kOwnForward) w.mix_own_kl[m] = own_sum / z - std::log(z);
    if (own == kOwnReverse) w.mix_own_kl[m] = own_sum * student.inv_z - student.log_z + std::log(z);
    if (own == kOwnOther) {
      w.mix_own_kl[m] = own_divergence_sweep(t, top, exps, z, s, student.top, student.exps, student.log_z,
                                             student.inv_z, a);
    }
    if (!counts) continue;  // its own divergence only
    offsets[m] = log_weights[m] - std::log(z);
    pending.add(exps, std::exp(log_weights[m]) / z);
    ++kept;
  }
  if (!student_max_known) w.mix_student_max = row_max(s, a.vocab);
  last = MixtureSum{};
  if (mixed_has_shares) last.add(mixed, 1.0f);
  for (int k = 0; k < pending.count; ++k) last.add(pending.rows[k], pending.factors[k]);
  return last.count > 0;
}

// The last pass: the mixture row p_bar is written, the sum of the kRows last rows, and the teacher row T * log p_bar.
template <int kRows, typename TeacherT>
void finish_mixture(const TeacherT* const* rows, int64_t count, const float* maxima, const float* offsets,
                    const MixtureSum& last, const DistillArgs& a, Scratch& w) {
  float* mixed = w.exp_teacher.data();
  float* out = w.teacher.data();
  const float temperature = a.temperature, inv_t = a.inv_temperature;
  // Whether any column fell below kSmallestMixture: OR-ed lane by lane, looked at once after the loop (a test per
  // lane and column was a fifth of this pass).
  VInt any_small{};
  const MixtureSum sum = last;  // a local copy, as teacher_pass's locals: the stores below may alias `last`
  for_lanes(a.vocab, [&](int64_t j, auto zero) {
    using F = decltype(zero);
    const F total = mixture_total<kRows, F>(sum, j);
    store(mixed + j, total);
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
// With `defer_log` (the fused phase's forward KL, whose gradient q - p_bar needs no log p_bar and whose loss weighs
// it by p_bar) the last pass is left to the kernel's exp pass (w.mix_log_deferred): p_bar is summed and
// log p_bar is taken there, beside the student's exps, and T * log p_bar is neither written nor read back. A column
// where every teacher underflowed then takes the log of its underflowed p_bar, which the loss weighs by that p_bar
// (0 for 0: `weighted`), so the exact log-sum-exp that reverse KL needs there is not taken.
template <typename TeacherT>
const float* mixture_row(const TeacherT* const* rows, int64_t count, const float* log_weights, int64_t row,
                         const DistillArgs& a, Scratch& w, const float* student, bool own, bool defer_log) {
  float maxima[kMaxMixedTeachers], offsets[kMaxMixedTeachers];
  const int own_kind = !own ? kOwnNone
                       : a.divergence == kForwardKL ? kOwnForward
                       : a.divergence == kReverseKL ? kOwnReverse
                                                    : kOwnOther;
  MixtureSum last;
  const bool any = mix_teachers(rows, count, log_weights, row, a, w, student, own_kind, maxima, offsets, last);
  float* out = w.teacher.data();
  w.mix_log_deferred = defer_log && any;
  if (w.mix_log_deferred) {
    w.mix_last = last;
    return out;
  }
  if (!any) {  // no teacher counts in this row: no mass anywhere, as a teacher row of -inf
    for (int64_t j = 0; j < a.vocab; ++j) w.exp_teacher[j] = 0.0f, out[j] = -INFINITY;
    return out;
  }
  switch (last.count) {
    case 1: finish_mixture<1>(rows, count, maxima, offsets, last, a, w); break;
    case 2: finish_mixture<2>(rows, count, maxima, offsets, last, a, w); break;
    case 3: finish_mixture<3>(rows, count, maxima, offsets, last, a, w); break;
    default: finish_mixture<4>(rows, count, maxima, offsets, last, a, w); break;
  }
  return out;
}

}  // namespace kdfast_cpu
