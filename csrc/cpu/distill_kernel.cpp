// CPU distillation row kernel (docs/DESIGN.md, "Algorithms" and "Shards and phases"). Per row:
//   pass 0  FUSED / STATS: the max of both rows (16-bit rows are widened into scratch here; float32 rows' maxima
//           the row before took in its pass 1, which streams this row in from memory beside its exps) and, for
//           reverse KL and the mixtures, the student's argmax r, the reference entry.
//           A shard's STATS reads the row once (stats_pass.h); its SUMS and GRADIENT take one pass from the global
//           log-sum-exps (shard_pass.h).
//   pass 1  tempered exps into a per-thread scratch row that stays in L2, their sums, and the centred sums that
//           give forward and reverse KL and the student's entropy without another pass
//   pass 2  mixtures (JSD, skews): per-element loss terms and scores d_j = h_j - h_r (h = dL/dq), D = sum q d
//   pass 3  the gradient: forward KL straight from the exps (q - p), reverse KL as q (c_j - D) with
//           c_j = ((s_j - s_r) - (t_j - t_r)) / T, the mixtures as q (d_j - D)
// Several teachers (mixture_row.h) are mixed into scratch before pass 0, which then takes the teacher's reference as 0
// (log p_bar <= 0) and pass 1 reads the teacher's exps (p_bar) instead of computing them; under forward KL pass 1 also
// sums p_bar from the teachers' last rows and takes log p_bar itself.
// Centring on r keeps the gradient near a dominant entry free of cancellation: there q_r ~ 1 and the old
// u_r - q_r U subtracted two numbers of the loss's size. The student gradient is (kd_scale / T) * dL/da plus the
// CE family's soft * softmax(s) - label * onehot(label) - uniform (kernel_abi.h), times the reduction's scale.
#include "distill_kernel.h"

#include <limits>

#include "gradient_pass.h"
#include "mixture_row.h"
#include "row_math.h"
#include "shard_pass.h"
#include "stats_pass.h"

namespace kdfast_cpu {
namespace {

// Pass 0: the maxima, and for reverse KL and the mixtures (fused) the reference entry r.
RowStats row_references(const float* s, const float* t, int64_t row, const DistillArgs& a, const Scratch& w) {
  RowStats st{};
  st.ref_index = -1;
  const bool mixed = a.has_kd && a.mix_count > 0;  // mixture_row took the student's max beside its passes
  const bool carried = w.next_row == row;           // the row before took both maxima beside its exps
  st.ref_s = mixed ? w.mix_student_max : carried ? w.next_student_max : row_max(s, a.vocab);
  st.ref_ce = st.ref_s;
  if (!a.has_kd) return st;
  // A mixture's row is T log p_bar <= 0.
  st.ref_t = a.mix_count > 0 ? 0.0f : carried ? w.next_teacher_max : row_max(t, a.vocab);
  st.t_at_ref = st.ref_t;
  if (a.phase == kPhaseFused && a.divergence != kForwardKL) {
    st.ref_index = first_index_of(s, a.vocab, st.ref_s);
    const float t_r = t[st.ref_index];
    // With no teacher mass at r (t_r = -inf) reverse KL is infinite anyway: centre on the teacher's max then.
    if (std::isfinite(t_r)) st.t_at_ref = t_r;
  }
  return st;
}

// What pass 1 sums beside the exps, as template flags: each loop instantiation keeps only its own accumulators in
// registers and has no branch inside (with runtime flags GCC kept every accumulator and spilled some to the stack).
enum ExpSums : int {
  kSumForwardKl = 1,      // sum_j e_t (dt - ds): forward KL
  kSumReverseKl = 2,      // sum_j e_s c_j: reverse KL
  kSumCeSquares = 4,      // sum_j e_s^2: CE's sum at T = 2
  kTeacherExpsGiven = 8,  // a mixture's p_bar in the teacher-exp row, not computed
  kMixLog = 16,           // a mixture's p_bar is summed here from its last rows (kMixRows of them), and log p_bar
                          // taken (forward KL)
  kNextMaxima = 64,       // the next row's student and teacher maxima, beside the prefetches of those rows
};
constexpr int kNotSums = kTeacherExpsGiven | kMixLog | kNextMaxima;  // the flags that pick a mode

// (flatten: with the mixture's log in its loop GCC called the lane loop out of line, its six sums kept in memory
// behind the closure, a memory add a sum and vector)
template <int kSums, int kMixRows = 0>
__attribute__((flatten)) void tempered_exps(const float* s, const float* t, const DistillArgs& a, Scratch& w,
                                            const NextRow& next, const RowStats& st, float* sums) {
  const float inv_t = a.inv_temperature;
  float* es = w.exp_student.data();
  float* et = w.exp_teacher.data();
  const float rs = st.ref_s, rt = st.ref_t, tr = st.t_at_ref;
  const MixtureSum last = w.mix_last;  // a local copy: the stores below may alias the scratch's fields
  // kNextMaxima: float32 rows, asked for 8 KiB ahead of where their maxima are taken (as mixture_row.h's passes
  // ask for theirs), so that the next row reads neither for its max alone
  const float* const next_s = reinterpret_cast<const float*>(next.student);
  const float* const next_t = reinterpret_cast<const float*>(next.teacher);
  RunningMax next_s_max, next_t_max;
  LaneSum z_s_acc{}, z_t_acc{}, z_ce_acc{}, fkl_acc{}, rkl_acc{}, entropy_acc{};
  for_lanes(a.vocab, [&](int64_t j, auto zero) {
    using F = decltype(zero);
    if constexpr ((kSums & kNextMaxima) != 0) {
      if constexpr (std::is_same_v<F, VFloat>) {
        __builtin_prefetch(next_s + j + kPrefetchAhead, 0, 3);
        __builtin_prefetch(next_t + j + kPrefetchAhead, 0, 3);
      }
      next_s_max.add(load<F>(next_s + j));
      next_t_max.add(load<F>(next_t + j));
    } else if (std::is_same_v<F, VFloat> && next.student != nullptr) {  // one 64-byte line per block and row
      __builtin_prefetch(next.student + j * next.student_element_bytes, 0, 2);
      __builtin_prefetch(next.teacher + j * next.teacher_element_bytes, 0, 2);
    }
    const F sj = load<F>(s + j);
    const F ds = (sj - rs) * inv_t;
    // Both are centred on their row's max (a mixture's log p_bar is <= 0): no overflow clamps.
    const F e_s = fast_exp_centred(ds);
    F e_t, dt, tj = zero;  // (tj: reverse KL's, never with a deferred mixture log)
    if constexpr ((kSums & kMixLog) != 0) {
      // p_bar is summed here from the mixture's last rows, and its log is the teacher's centred logit (mixture_row.h).
      e_t = mixture_total<kMixRows, F>(last, j);
      store(et + j, e_t);
      dt = fast_log_ge1(e_t);
    } else {
      tj = load<F>(t + j);
      dt = (tj - rt) * inv_t;
      if constexpr ((kSums & kTeacherExpsGiven) != 0) {
        e_t = load<F>(et + j);
      } else {
        e_t = fast_exp_centred(dt);
        store(et + j, e_t);
      }
    }
    store(es + j, e_s);
    accumulate(z_s_acc, e_s);
    accumulate(z_t_acc, e_t);
    accumulate_weighted(entropy_acc, e_s, ds);
    // Centred on both maxima so that a constant offset between the models cannot cancel away digits.
    if constexpr ((kSums & kSumForwardKl) != 0) accumulate_weighted(fkl_acc, e_t, dt - ds);
    // Centred on r: c_r = 0 exactly, and c_j is a difference of logit differences.
    if constexpr ((kSums & kSumReverseKl) != 0) accumulate_weighted(rkl_acc, e_s, ((sj - rs) - (tj - tr)) * inv_t);
    if constexpr ((kSums & kSumCeSquares) != 0) accumulate(z_ce_acc, e_s * e_s);  // exp(s - m) = exp((s - m) / 2)^2
  });
  if constexpr ((kSums & kNextMaxima) != 0) {
    w.next_row = next.row;
    w.next_student_max = next_s_max.value();
    w.next_teacher_max = next_t_max.value();
  }
  sums[0] = horizontal_sum(z_s_acc), sums[1] = horizontal_sum(z_t_acc), sums[2] = horizontal_sum(z_ce_acc);
  sums[3] = horizontal_sum(fkl_acc), sums[4] = horizontal_sum(rkl_acc), sums[5] = horizontal_sum(entropy_acc);
}

// The teacher's mode (its exps computed, given, or a mixture's sum and log taken here from its 1 to kMixLastRows last
// rows) to one instantiation.
template <int kSums>
void with_teacher_mode(int mode, const float* s, const float* t, const DistillArgs& a, Scratch& w, const NextRow& next,
                       const RowStats& st, float* sums) {
  if (mode == kTeacherExpsGiven) return tempered_exps<kSums | kTeacherExpsGiven>(s, t, a, w, next, st, sums);
  if constexpr ((kSums & kSumForwardKl) != 0) {  // a deferred mixture log: forward KL's alone
    static_assert(kMixLastRows == 4, "one instantiation per count of the mixture's last rows");
    if (mode == kMixLog) {
      switch (w.mix_last.count) {
        case 1: return tempered_exps<kSums | kMixLog, 1>(s, t, a, w, next, st, sums);
        case 2: return tempered_exps<kSums | kMixLog, 2>(s, t, a, w, next, st, sums);
        case 3: return tempered_exps<kSums | kMixLog, 3>(s, t, a, w, next, st, sums);
        default: return tempered_exps<kSums | kMixLog, 4>(s, t, a, w, next, st, sums);
      }
    }
  }
  return tempered_exps<kSums>(s, t, a, w, next, st, sums);
}

// The runtime flags to one instantiation of tempered_exps (forward and reverse KL never both).
template <int kSums>
void tempered_exps_with(int flags, const float* s, const float* t, const DistillArgs& a, Scratch& w,
                        const NextRow& next, const RowStats& st, float* sums) {
  if constexpr (kSums == 0) {
    switch (flags & ~kNotSums) {
      case kSumForwardKl: return tempered_exps_with<kSumForwardKl>(flags, s, t, a, w, next, st, sums);
      case kSumReverseKl: return tempered_exps_with<kSumReverseKl>(flags, s, t, a, w, next, st, sums);
      case kSumCeSquares: return tempered_exps_with<kSumCeSquares>(flags, s, t, a, w, next, st, sums);
      case kSumForwardKl | kSumCeSquares:
        return tempered_exps_with<kSumForwardKl | kSumCeSquares>(flags, s, t, a, w, next, st, sums);
      case kSumReverseKl | kSumCeSquares:
        return tempered_exps_with<kSumReverseKl | kSumCeSquares>(flags, s, t, a, w, next, st, sums);
      default: break;  // none of them
    }
  }
  const int mode = flags & (kTeacherExpsGiven | kMixLog);
  if ((flags & kNextMaxima) != 0) return with_teacher_mode<kSums | kNextMaxima>(mode, s, t, a, w, next, st, sums);
  return with_teacher_mode<kSums>(mode, s, t, a, w, next, st, sums);
}

// Pass 1: the exps into scratch, their sums, the KL sums and sum_j e_j d_j for the student's entropy (at T with a
// divergence, from the tempered exps; for CE alone at T = 1, from CE's own).
void exp_pass(const float* s, const float* t, const DistillArgs& a, Scratch& w, const NextRow& next, RowStats& st) {
  const int64_t vocab = a.vocab;
  const float inv_t = a.inv_temperature;
  float* ec = w.exp_ce.data();
  float sums[6] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};  // z_s, z_t, z_ce, forward KL, reverse KL, entropy
  const bool ce_from_tempered = a.has_ce && a.has_kd && (a.temperature_power == 1 || a.temperature_power == 2);
  if (a.has_kd) {
    const int flags = (a.divergence == kForwardKL ? kSumForwardKl : 0) |
                      (a.divergence == kReverseKL ? kSumReverseKl : 0) |
                      (a.has_ce && a.temperature_power == 2 ? kSumCeSquares : 0) |
                      (a.mix_count == 0     ? 0
                       : !w.mix_log_deferred ? kTeacherExpsGiven  // p_bar, against the reference 0
                                             : kMixLog) |
                      (next.student != nullptr && next.student_element_bytes == 4 && next.teacher_element_bytes == 4
                           ? kNextMaxima
                           : 0);
    tempered_exps_with<0>(flags, s, t, a, w, next, st, sums);
  }
  LaneSum z_ce_acc{}, entropy_acc{};
  if (a.has_ce && !ce_from_tempered) {
    const float rc = st.ref_ce;
    const bool ce_alone = !a.has_kd;  // the entropy is then CE's, at T = 1
    for_lanes(vocab, [&](int64_t j, auto zero) {
      using F = decltype(zero);
      const F d = load<F>(s + j) - rc;
      const F e = fast_exp_centred(d);
      store(ec + j, e);
      accumulate(z_ce_acc, e);
      if (ce_alone) accumulate_weighted(entropy_acc, e, d);
    });
    sums[2] = horizontal_sum(z_ce_acc);
    if (ce_alone) sums[5] = horizontal_sum(entropy_acc);
  }
  const float z_s = sums[0], z_t = sums[1];
  const float z_ce = (ce_from_tempered && a.temperature_power == 1) ? z_s : sums[2];
  st.log_z_s = std::log(z_s);
  st.log_z_t = std::log(z_t);
  st.inv_z_s = 1.0f / z_s;
  st.inv_z_t = 1.0f / z_t;
  st.log_z_ce = std::log(z_ce);
  st.inv_z_ce = 1.0f / z_ce;
  st.forward_kl = sums[3] * st.inv_z_t - st.log_z_t + st.log_z_s;
  st.centred = sums[4] * st.inv_z_s;
  st.rkl_offset = (st.ref_t - st.t_at_ref) * inv_t - st.log_z_s + st.log_z_t;
  const float entropy_sum = sums[5];
  if (a.has_kd) {
    st.entropy = entropy_from_sums(st.log_z_s, st.inv_z_s, entropy_sum);
  } else if (a.has_ce) {
    st.entropy = entropy_from_sums(st.log_z_ce, st.inv_z_ce, entropy_sum);
  }
}

// The score at the reference entry (fused calls), computed as pass 2 computes it there; 0 without one.
float reference_score(const float* t, const DistillArgs& a, const RowStats& st, const MixtureConstants& mc) {
  if (st.ref_index < 0) return 0.0f;
  const float ls = -st.log_z_s;  // s_r is the row's max
  const float lt = (t[st.ref_index] - st.ref_t) * a.inv_temperature - st.log_z_t;
  const float p = fast_exp((t[st.ref_index] - st.ref_t) * a.inv_temperature) * st.inv_z_t;
  float term, h;
  mixture_term_and_score<float>(a.divergence, mc, ls, lt, st.inv_z_s, p, term, h);
  return h;
}

// Pass 2 (mixtures): returns the sum of the loss terms over these columns; writes d_j = h_j - h_ref into the
// teacher-exp slot (each entry read just before) and sets *d_sum = sum_j q_j d_j.
__attribute__((flatten)) float mixture_pass(const float* s, const float* t, const DistillArgs& a, const RowStats& st,
                                            Scratch& w, float* d_sum) {
  const MixtureConstants mc(a.beta, a.one_minus_beta);
  const float h_ref = reference_score(t, a, st, mc);
  const float inv_t = a.inv_temperature;
  const float* es = w.exp_student.data();
  float* et = w.exp_teacher.data();
  LaneSum kd_acc{}, d_acc{};
  const int divergence = a.divergence;
  for_lanes(a.vocab, [&](int64_t j, auto zero) {
    using F = decltype(zero);
    const F q = load<F>(es + j) * st.inv_z_s;
    const F p = load<F>(et + j) * st.inv_z_t;
    const F ls = (load<F>(s + j) - st.ref_s) * inv_t - st.log_z_s;
    const F lt = (load<F>(t + j) - st.ref_t) * inv_t - st.log_z_t;
    F term, h;
    mixture_term_and_score<F>(divergence, mc, ls, lt, q, p, term, h);
    const F d = h - h_ref;
    store(et + j, d);
    accumulate(kd_acc, term);
    accumulate_weighted(d_acc, q, d);
  });
  float total_d = horizontal_sum(d_acc);
  if (st.ref_index >= 0) {  // d_r is 0 by definition, not merely up to rounding
    total_d -= weighted(es[st.ref_index] * st.inv_z_s, et[st.ref_index]);
    et[st.ref_index] = 0.0f;
  }
  *d_sum = total_d;
  return horizontal_sum(kd_acc);
}

// One kept row in any phase: writes its outputs (and its gradient when g is set).
template <typename GradT>
void process_row(const float* s, const float* t, int64_t row, int64_t label, GradT* g, float row_scale,
                 const DistillArgs& a, Scratch& w, const NextRow& next) {
  const int64_t local_label = a.labels != nullptr ? label - a.col_offset : -1;
  const bool in_range = local_label >= 0 && local_label < a.vocab;
  const bool held = a.has_ce && in_range;  // CE's label here
  // Read before the gradient is written: it may overwrite the logits (inplace_backward).
  const float s_label = in_range ? s[local_label] : 0.0f;
  if (a.phase == kPhaseSums || a.phase == kPhaseGradient) {
    // The CE target's logit over these columns, read before the gradient may overwrite them.
    const bool smoothing = a.phase == kPhaseSums && a.has_ce && a.label_smoothing != 0.0f;
    const float target = ce_target_logit(a, s_label, smoothing ? shifted_row_sum(s, a.vocab, 0.0f) : 0.0f);
    const ShardSums sums = shard_row(s, t, g, row, row_scale, held ? local_label : -1, a);
    if (a.phase == kPhaseSums) {
      float* out = a.out + row * kStatColumns;
      out[0] = sums.kd, out[1] = sums.d, out[2] = target, out[3] = sums.q_log_q;
    }
    return;
  }
  if (a.phase == kPhaseStats) return stats_row(s, t, a, a.out + row * kStatColumns);
  RowStats st = row_references(s, t, row, a, w);
  exp_pass(s, t, a, w, next, st);
  if (a.mix_divergences != nullptr) {  // each mixed teacher's forward KL but log z_s, or its whole reverse KL
    const float add = a.divergence == kForwardKL ? st.log_z_s : 0.0f;
    for (int64_t m = 0; m < a.mix_count; ++m) a.mix_divergences[row * a.mix_count + m] = w.mix_own_kl[m] + add;
  }
  float kd = 0.0f, row_sum = 0.0f;
  KdSource kd_source = kNoKd;
  if (a.has_kd && a.divergence == kForwardKL) {
    kd = st.forward_kl;
    kd_source = kKdFromExps;
  } else if (a.has_kd && a.divergence == kReverseKL) {
    row_sum = st.centred;
    kd = row_sum + st.rkl_offset;
    kd_source = kKdFromLogits;
  } else if (a.has_kd) {
    kd = mixture_pass(s, t, a, st, w, &row_sum);
    kd_source = kKdFromScores;
  }
  // Read before the gradient may overwrite the logits (inplace_backward).
  const float shifted_sum = a.has_ce && a.label_smoothing != 0.0f ? shifted_row_sum(s, a.vocab, st.ref_ce) : 0.0f;
  if (g != nullptr) {
    const GradientTerms terms{s, t, w.exp_teacher.data(), row_sum, row_scale * a.kd_scale * a.inv_temperature,
                              ce_coefficients(a, row_scale, st.ref_ce + st.log_z_ce)};
    write_gradient(g, kd_source, terms, held ? local_label : -1, a, st, w);
  }
  write_fused_parts(a, row, kd, st, s_label, in_range, shifted_sum);
}

// A skipped row's own divergence of each mixed teacher (when they are written): `value` for all.
void skip_own_divergences(const DistillArgs& a, int64_t row, float value) {
  if (a.mix_divergences == nullptr) return;
  for (int64_t m = 0; m < a.mix_count; ++m) a.mix_divergences[row * a.mix_count + m] = value;
}

template <typename StudentT, typename TeacherT>
void run_rows(const DistillArgs& a, int64_t row_begin, int64_t row_end) {
  thread_local Scratch scratch;
  scratch.reserve(a.vocab, a.has_kd && a.mix_count > 0);
  scratch.next_row = -1;
  const float row_scale = a.grad != nullptr ? *a.grad_scale : 0.0f;
  auto student_row = [&](int64_t row) {
    return static_cast<const StudentT*>(a.student) + (row / a.rows_per_batch) * a.student_stride_b +
           (row % a.rows_per_batch) * a.student_stride_r;
  };
  auto teacher_row = [&](int64_t row) {
    return static_cast<const TeacherT*>(a.teacher) + (row / a.rows_per_batch) * a.teacher_stride_b +
           (row % a.rows_per_batch) * a.teacher_stride_r;
  };
  auto mixed_teacher_row = [&](int64_t m, int64_t row) {
    return static_cast<const TeacherT*>(a.mix_teachers[m]) + (row / a.rows_per_batch) * a.teacher_stride_b +
           (row % a.rows_per_batch) * a.teacher_stride_r;
  };
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t b = row / a.rows_per_batch, r = row % a.rows_per_batch;
    const StudentT* s_raw = student_row(row);
    const TeacherT* t_raw = a.mix_count > 0 ? nullptr : teacher_row(row);
    NextRow next;
    if (row + 1 < row_end) {
      next = {reinterpret_cast<const char*>(student_row(row + 1)),
              reinterpret_cast<const char*>(a.mix_count > 0 ? mixed_teacher_row(0, row + 1) : teacher_row(row + 1)),
              static_cast<int>(sizeof(StudentT)), static_cast<int>(sizeof(TeacherT)), row + 1};
    }
    StudentT* g = a.grad == nullptr ? nullptr
                                    : static_cast<StudentT*>(a.grad) + b * a.grad_stride_b + r * a.grad_stride_r;
    const int64_t label = a.labels != nullptr ? a.labels[row] : 0;
    if (a.labels != nullptr && label == a.ignore_index) {
      write_skipped_row(a, row, 0.0f);
      skip_own_divergences(a, row, 0.0f);
      if (g != nullptr) zero_row(g, a.vocab);
      continue;
    }
    // The host check refuses these; never read out of bounds. (A shard holds only some labels: not an error.)
    if (a.phase == kPhaseFused && a.ce_weight != 0.0f && (label < 0 || label >= a.vocab)) {
      write_skipped_row(a, row, std::numeric_limits<float>::quiet_NaN());
      skip_own_divergences(a, row, std::numeric_limits<float>::quiet_NaN());
      if (g != nullptr) zero_row(g, a.vocab);
      continue;
    }
    const float* s = widen_row(s_raw, a.vocab, scratch.student);
    const float* t = nullptr;
    if (a.has_kd && a.mix_count > 0) {
      const TeacherT* rows[kMaxMixedTeachers];
      for (int64_t m = 0; m < a.mix_count; ++m) rows[m] = mixed_teacher_row(m, row);
      t = mixture_row(rows, a.mix_count, a.mix_log_weights + row * a.mix_weights_stride, row, a, scratch, s,
                      a.mix_divergences != nullptr, a.phase == kPhaseFused && a.divergence == kForwardKL);
    } else if (a.has_kd) {
      t = widen_row(t_raw, a.vocab, scratch.teacher);
    }
    process_row(s, t, row, label, g, row_scale, a, scratch, next);
  }
}

template <typename StudentT>
void dispatch_teacher(const DistillArgs& a, int64_t row_begin, int64_t row_end) {
  switch (a.teacher_kind) {
    case ScalarKind::kFloat32: return run_rows<StudentT, float>(a, row_begin, row_end);
    case ScalarKind::kBFloat16: return run_rows<StudentT, BFloat16>(a, row_begin, row_end);
    case ScalarKind::kFloat16: return run_rows<StudentT, Float16>(a, row_begin, row_end);
  }
}

}  // namespace

void distill_rows_cpu(const DistillArgs& args, int64_t row_begin, int64_t row_end) {
  switch (args.student_kind) {
    case ScalarKind::kFloat32: return dispatch_teacher<float>(args, row_begin, row_end);
    case ScalarKind::kBFloat16: return dispatch_teacher<BFloat16>(args, row_begin, row_end);
    case ScalarKind::kFloat16: return dispatch_teacher<Float16>(args, row_begin, row_end);
  }
}

}  // namespace kdfast_cpu
