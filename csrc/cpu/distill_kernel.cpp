// CPU distillation row kernel (DESIGN.md, "Algorithms"). Per row:
//   pass 0  max of both rows (the only pass that reads memory; 16-bit rows are widened into scratch here)
//   pass 1  tempered exps into a per-thread scratch row that stays in L2, their sums, and the centred sums
//           that give forward and reverse KL without another pass
//   pass 2  (all but forward KL) per-element loss terms; reverse KL stores its gradient, JSD and the skews
//           store u_j = q_j * dL/dq_j and U = sum u
//   pass 3  the gradient: forward KL straight from the exps (q - p), reverse KL from pass 2's buffer,
//           JSD and the skews as dL/da_j = u_j - q_j * U
// The student gradient is (kd_scale / T) * dL/da + ce_weight * (softmax(s) - onehot(label)), times the
// reduction's scale.
#include "distill_kernel.h"

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "simd_math.h"

namespace kdfast_cpu {
namespace {

struct Scratch {
  std::vector<float> student, teacher, exp_student, exp_teacher, exp_ce;
  void reserve(int64_t vocab) {
    for (auto* buffer : {&student, &teacher, &exp_student, &exp_teacher, &exp_ce}) {
      if (static_cast<int64_t>(buffer->size()) < vocab) buffer->resize(vocab);
    }
  }
};

template <typename T>
const float* widen_row(const T* row, int64_t vocab, std::vector<float>& out) {
  float* dst = out.data();
  for (int64_t j = 0; j < vocab; ++j) dst[j] = to_float(row[j]);
  return dst;
}
const float* widen_row(const float* row, int64_t, std::vector<float>&) { return row; }

// Runs body(j, F{}) over a row: F = VFloat on full vector blocks, then F = float on the tail.
template <typename Body>
inline void for_lanes(int64_t vocab, Body&& body) {
  int64_t j = 0;
  for (; j + kLanes <= vocab; j += kLanes) body(j, VFloat{});
  for (; j < vocab; ++j) body(j, 0.0f);
}

// Vector accumulators; the scalar tail adds into lane 0.
inline void accumulate(VFloat& acc, VFloat value) { acc += value; }
inline void accumulate(VFloat& acc, float value) { acc[0] += value; }

float row_max(const float* x, int64_t vocab) {
  VFloat best = splat<VFloat>(-INFINITY);
  float tail = -INFINITY;
  for_lanes(vocab, [&](int64_t j, auto zero) {
    using F = decltype(zero);
    const F v = load<F>(x + j);
    if constexpr (std::is_same_v<F, VFloat>) {
      best = v > best ? v : best;
    } else {
      tail = v > tail ? v : tail;
    }
  });
  const float head = horizontal_max(best);
  return head > tail ? head : tail;
}

// 0 * (anything) = 0: a zero probability adds nothing even against a log of -inf.
template <typename F>
inline F weighted(F prob, F log_ratio) {
  return prob == 0.0f ? splat<F>(0.0f) : prob * log_ratio;
}

struct RowStats {
  float max_s, max_t, log_z_s, log_z_t, inv_z_s, inv_z_t, log_z_ce, inv_z_ce, forward_kl, reverse_kl;
};

// The next row's logits, prefetched into L2 while this row computes: pass 0 is the only pass that reads
// memory, and without this it waits on DRAM while the core idles (measured: ~16% of the kernel).
struct NextRow {
  const char* student = nullptr;
  const char* teacher = nullptr;
  int student_element_bytes = 4, teacher_element_bytes = 4;
};

RowStats exp_pass(const float* s, const float* t, const DistillArgs& a, Scratch& w, const NextRow& next) {
  const int64_t vocab = a.vocab;
  const float inv_t = a.inv_temperature;
  RowStats st{};
  st.max_s = row_max(s, vocab);
  float* es = w.exp_student.data();
  float* et = w.exp_teacher.data();
  float* ec = w.exp_ce.data();
  VFloat z_s_acc{}, z_t_acc{}, z_ce_acc{}, fkl_acc{}, rkl_acc{};
  const float ms = st.max_s;
  if (a.has_kd) {
    st.max_t = row_max(t, vocab);
    const float mt = st.max_t;
    const bool want_fkl = a.divergence == kForwardKL, want_rkl = a.divergence == kReverseKL;
    const bool ce_squared = a.has_ce && a.temperature_power == 2;
    for_lanes(vocab, [&](int64_t j, auto zero) {
      using F = decltype(zero);
      if (std::is_same_v<F, VFloat> && next.student != nullptr) {  // one 64-byte line per block and row
        __builtin_prefetch(next.student + j * next.student_element_bytes, 0, 2);
        __builtin_prefetch(next.teacher + j * next.teacher_element_bytes, 0, 2);
      }
      const F ds = (load<F>(s + j) - ms) * inv_t;
      const F dt = (load<F>(t + j) - mt) * inv_t;
      const F e_s = fast_exp(ds);
      const F e_t = fast_exp(dt);
      store(es + j, e_s);
      store(et + j, e_t);
      accumulate(z_s_acc, e_s);
      accumulate(z_t_acc, e_t);
      // Centred on both maxima so that a constant offset between the models cannot cancel away digits.
      if (want_fkl) accumulate(fkl_acc, weighted(e_t, dt - ds));
      if (want_rkl) accumulate(rkl_acc, weighted(e_s, ds - dt));
      if (ce_squared) accumulate(z_ce_acc, e_s * e_s);  // exp(s - m) = exp((s - m) / 2)^2
    });
  }
  const float z_s = horizontal_sum(z_s_acc), z_t = horizontal_sum(z_t_acc);
  if (a.has_ce && !(a.has_kd && a.temperature_power == 2)) {
    if (a.has_kd && a.temperature_power == 1) {
      z_ce_acc = splat<VFloat>(0.0f);
      z_ce_acc[0] = z_s;
    } else {
      for_lanes(vocab, [&](int64_t j, auto zero) {
        using F = decltype(zero);
        const F e = fast_exp(load<F>(s + j) - ms);
        store(ec + j, e);
        accumulate(z_ce_acc, e);
      });
    }
  }
  const float z_ce = horizontal_sum(z_ce_acc);
  st.log_z_s = std::log(z_s);
  st.log_z_t = std::log(z_t);
  st.inv_z_s = 1.0f / z_s;
  st.inv_z_t = 1.0f / z_t;
  st.log_z_ce = std::log(z_ce);
  st.inv_z_ce = 1.0f / z_ce;
  st.forward_kl = horizontal_sum(fkl_acc) * st.inv_z_t - st.log_z_t + st.log_z_s;
  st.reverse_kl = horizontal_sum(rkl_acc) * st.inv_z_s - st.log_z_s + st.log_z_t;
  return st;
}

// How the gradient pass finds softmax(s)_j at temperature 1: from the tempered exps (T = 1: as they are,
// T = 2: squared) or from the separate exps pass 1 kept. A template parameter, so each loop is branch-free.
enum CeSource : int { kNoCe = 0, kCeFromTempered = 1, kCeFromTemperedSquared = 2, kCeFromOwnExps = 3 };

// Where the gradient pass finds the KD part of dL/da_j: pass 2's buffer (reverse KL), q - p straight from the
// exps (forward KL: no pass 2 at all), or u_j - q_j * U (JSD, skews).
enum KdSource : int { kNoKd = 0, kKdFromBuffer = 1, kKdFromExps = 2, kKdUMinusQU = 3 };

// Pass 2 (all but forward KL, whose value and gradient come from pass 1): the divergence value, and into
// kd_buffer (the teacher-exp slot, each entry read just before) reverse KL's gradient or the JSD/skew u_j.
float divergence_pass(const float* s, const float* t, const DistillArgs& a, const RowStats& st, Scratch& w,
                      float* kd_buffer, float* u_sum) {
  const int64_t vocab = a.vocab;
  const float inv_t = a.inv_temperature, beta = a.beta;
  const float log_beta = beta > 0.0f ? std::log(beta) : -INFINITY;
  const float log_1m_beta = beta < 1.0f ? std::log1p(-beta) : -INFINITY;
  const float* es = w.exp_student.data();
  float* et = w.exp_teacher.data();
  VFloat kd_acc{}, u_acc{};
  const float ms = st.max_s, mt = st.max_t;
  const int divergence = a.divergence;
  // Per-element loss terms; each case is branch-free inside, the switch is per block.
  for_lanes(vocab, [&](int64_t j, auto zero) {
    using F = decltype(zero);
    const F q = load<F>(es + j) * st.inv_z_s;
    const F ls = (load<F>(s + j) - ms) * inv_t - st.log_z_s;
    const F lt = (load<F>(t + j) - mt) * inv_t - st.log_z_t;
    switch (divergence) {
      case kReverseKL:
        store(kd_buffer + j, weighted(q, ls - lt - st.reverse_kl));
        break;
      case kJSD: {
        const F p = load<F>(et + j) * st.inv_z_t;
        const F lm = log_add_exp(lt + log_beta, ls + log_1m_beta);
        const F q_term = weighted(q, ls - lm);
        accumulate(kd_acc, beta * weighted(p, lt - lm) + (1.0f - beta) * q_term);
        const F u = (1.0f - beta) * q_term;  // q * dL/dq
        store(et + j, u);
        accumulate(u_acc, u);
        break;
      }
      case kSkewForwardKL: {
        const F p = load<F>(et + j) * st.inv_z_t;
        const F lm = log_add_exp(lt + log_beta, ls + log_1m_beta);
        accumulate(kd_acc, weighted(p, lt - lm));
        // -(1-b) q p / m in log space: q may underflow where p / m is huge (beta = 0: m = q).
        const F u = lm == -INFINITY ? splat<F>(0.0f) : -(1.0f - beta) * fast_exp(ls + lt - lm);
        store(et + j, u);
        accumulate(u_acc, u);
        break;
      }
      default: {  // kSkewReverseKL
        const F lm = log_add_exp(ls + log_beta, lt + log_1m_beta);
        accumulate(kd_acc, weighted(q, ls - lm));
        // q * dL/dq; beta * q / m as exp(log beta + ls - lm): at beta = 0, q / m may overflow (0 * inf).
        const F u = weighted(q, ls - lm - fast_exp(ls - lm + log_beta));
        store(et + j, u);
        accumulate(u_acc, u);
        break;
      }
    }
  });
  const float usum = horizontal_sum(u_acc);
  const float kd = divergence == kReverseKL ? st.reverse_kl : horizontal_sum(kd_acc);
  *u_sum = usum;
  return kd;
}

template <int kKd, int kCe, typename GradT>
void write_gradient_loop(GradT* g, const float* kd_buffer, float u_sum, float kd_coef, float ce_coef,
                         const RowStats& st, const Scratch& w, int64_t vocab) {
  const float* es = w.exp_student.data();
  const float* et = w.exp_teacher.data();
  const float* ec = w.exp_ce.data();
  const float q_u = st.inv_z_s * u_sum;
  for_lanes(vocab, [&](int64_t j, auto zero) {
    using F = decltype(zero);
    F kd_part = zero;
    if constexpr (kKd == kKdFromBuffer) kd_part = load<F>(kd_buffer + j);
    if constexpr (kKd == kKdFromExps) kd_part = load<F>(es + j) * st.inv_z_s - load<F>(et + j) * st.inv_z_t;
    if constexpr (kKd == kKdUMinusQU) kd_part = load<F>(kd_buffer + j) - load<F>(es + j) * q_u;
    F ce_part = zero;
    if constexpr (kCe == kCeFromTempered) ce_part = load<F>(es + j) * st.inv_z_ce;
    if constexpr (kCe == kCeFromTemperedSquared) ce_part = load<F>(es + j) * load<F>(es + j) * st.inv_z_ce;
    if constexpr (kCe == kCeFromOwnExps) ce_part = load<F>(ec + j) * st.inv_z_ce;
    store_grad(g + j, kd_coef * kd_part + ce_coef * ce_part);
  });
}

// Turns the runtime (kd source, ce source) pair into one branch-free loop instantiation.
template <int kCe, typename GradT>
void write_gradient_ce(GradT* g, const float* kd_buffer, KdSource kd_source, float u_sum, float kd_coef,
                       float ce_coef, const RowStats& st, const Scratch& w, int64_t vocab) {
  switch (kd_source) {
    case kNoKd: return write_gradient_loop<kNoKd, kCe>(g, kd_buffer, u_sum, kd_coef, ce_coef, st, w, vocab);
    case kKdFromBuffer:
      return write_gradient_loop<kKdFromBuffer, kCe>(g, kd_buffer, u_sum, kd_coef, ce_coef, st, w, vocab);
    case kKdFromExps:
      return write_gradient_loop<kKdFromExps, kCe>(g, kd_buffer, u_sum, kd_coef, ce_coef, st, w, vocab);
    case kKdUMinusQU:
      return write_gradient_loop<kKdUMinusQU, kCe>(g, kd_buffer, u_sum, kd_coef, ce_coef, st, w, vocab);
  }
}

template <typename GradT>
void write_gradient(GradT* g, const float* kd_buffer, KdSource kd_source, float u_sum, int64_t label,
                    float row_scale, const DistillArgs& a, const RowStats& st, const Scratch& w) {
  const float kd_coef = row_scale * a.kd_scale * a.inv_temperature;
  const float ce_coef = row_scale * a.ce_weight;
  CeSource ce_source = kNoCe;
  if (a.has_ce) {
    ce_source = !a.has_kd ? kCeFromOwnExps
                : a.temperature_power == 1 ? kCeFromTempered
                : a.temperature_power == 2 ? kCeFromTemperedSquared
                                           : kCeFromOwnExps;
  }
  switch (ce_source) {
    case kNoCe: write_gradient_ce<kNoCe>(g, kd_buffer, kd_source, u_sum, kd_coef, ce_coef, st, w, a.vocab); break;
    case kCeFromTempered:
      write_gradient_ce<kCeFromTempered>(g, kd_buffer, kd_source, u_sum, kd_coef, ce_coef, st, w, a.vocab);
      break;
    case kCeFromTemperedSquared:
      write_gradient_ce<kCeFromTemperedSquared>(g, kd_buffer, kd_source, u_sum, kd_coef, ce_coef, st, w, a.vocab);
      break;
    case kCeFromOwnExps:
      write_gradient_ce<kCeFromOwnExps>(g, kd_buffer, kd_source, u_sum, kd_coef, ce_coef, st, w, a.vocab);
      break;
  }
  if (a.has_ce) from_float(to_float(g[label]) - ce_coef, &g[label]);
}

template <typename GradT>
float process_row(const float* s, const float* t, int64_t label, float row_scale, GradT* g,
                  const DistillArgs& a, Scratch& w, const NextRow& next) {
  const RowStats st = exp_pass(s, t, a, w, next);
  float kd = 0.0f, u_sum = 0.0f;
  KdSource kd_source = kNoKd;
  // Pass 2 writes its per-element buffer into the teacher-exp slot once it has been read.
  float* kd_buffer = w.exp_teacher.data();
  if (a.has_kd && a.divergence == kForwardKL) {
    kd = st.forward_kl;
    kd_source = kKdFromExps;
  } else if (a.has_kd) {
    kd = divergence_pass(s, t, a, st, w, kd_buffer, &u_sum);
    kd_source = a.divergence == kReverseKL ? kKdFromBuffer : kKdUMinusQU;
  }
  float ce = 0.0f;
  if (a.has_ce) ce = st.log_z_ce - (s[label] - st.max_s);
  if (g != nullptr) write_gradient(g, kd_buffer, kd_source, u_sum, label, row_scale, a, st, w);
  return a.kd_scale * kd + a.ce_weight * ce;
}

template <typename GradT>
void zero_row(GradT* g, int64_t vocab) {
  for (int64_t j = 0; j < vocab; ++j) from_float(0.0f, &g[j]);
}

template <typename StudentT, typename TeacherT>
void run_rows(const DistillArgs& a, int64_t row_begin, int64_t row_end) {
  thread_local Scratch scratch;
  scratch.reserve(a.vocab);
  const float row_scale = a.grad != nullptr ? *a.grad_scale : 0.0f;
  auto student_row = [&](int64_t row) {
    return static_cast<const StudentT*>(a.student) + (row / a.rows_per_batch) * a.student_stride_b +
           (row % a.rows_per_batch) * a.student_stride_r;
  };
  auto teacher_row = [&](int64_t row) {
    return static_cast<const TeacherT*>(a.teacher) + (row / a.rows_per_batch) * a.teacher_stride_b +
           (row % a.rows_per_batch) * a.teacher_stride_r;
  };
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t b = row / a.rows_per_batch, r = row % a.rows_per_batch;
    const StudentT* s_raw = student_row(row);
    const TeacherT* t_raw = teacher_row(row);
    NextRow next;
    if (row + 1 < row_end) {
      next = {reinterpret_cast<const char*>(student_row(row + 1)), reinterpret_cast<const char*>(teacher_row(row + 1)),
              static_cast<int>(sizeof(StudentT)), static_cast<int>(sizeof(TeacherT))};
    }
    StudentT* g = a.grad == nullptr ? nullptr
                                    : static_cast<StudentT*>(a.grad) + b * a.grad_stride_b + r * a.grad_stride_r;
    const int64_t label = a.labels != nullptr ? a.labels[row] : 0;
    if (a.labels != nullptr && label == a.ignore_index) {
      a.loss_rows[row] = 0.0f;
      if (g != nullptr) zero_row(g, a.vocab);
      continue;
    }
    if (a.has_ce && (label < 0 || label >= a.vocab)) {  // the host check refuses these; never read out of bounds
      a.loss_rows[row] = std::numeric_limits<float>::quiet_NaN();
      if (g != nullptr) zero_row(g, a.vocab);
      continue;
    }
    const float* s = widen_row(s_raw, a.vocab, scratch.student);
    const float* t = a.has_kd ? widen_row(t_raw, a.vocab, scratch.teacher) : nullptr;
    a.loss_rows[row] = process_row(s, t, label, row_scale, g, a, scratch, next);
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
