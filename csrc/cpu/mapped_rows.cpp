// Method "mapped" under forward KL in one pass per row. The teacher's rest mass spread over the student's unmatched
// columns as the student spreads its own, target_j = P_r q_j / Q_r, makes the bucket KL a dense one: the rest's term
// is P_r log(P_r / Q_r) and the gradient q - target is the bucket KL's exactly (docs/DESIGN.md, "Teachers with
// another tokenizer", derives it). P_r and Q_r are summed over each side's own unmatched columns, never as 1 - sum(P_k), which cancels when
// they are small.
#include "mapped_rows.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "simd_math.h"

namespace kdfast_cpu {
namespace {

// log sum exp(x * scale) over a row, vectorised.
float row_log_sum_exp(const float* x, int64_t width, float scale) {
  const int64_t vector_end = width - width % kLanes;
  const float top = row_max_scaled(x, width, scale);
  if (top == -INFINITY) return top;
  VFloat sum_lanes = splat<VFloat>(0.0f);
  for (int64_t j = 0; j < vector_end; j += kLanes) sum_lanes += fast_exp(load<VFloat>(x + j) * scale - top);
  double sum = horizontal_sum(sum_lanes);
  for (int64_t j = vector_end; j < width; ++j) sum += fast_exp(x[j] * scale - top);
  return static_cast<float>(top + std::log(sum));
}

// log sum exp(x[columns] * scale) - shift, by gathers.
float gathered_log_sum_exp(const float* x, const int64_t* columns, int64_t count, float scale, float shift) {
  float top = -INFINITY;
  for (int64_t k = 0; k < count; ++k) top = std::max(top, x[columns[k]] * scale - shift);
  if (top == -INFINITY) return top;
  double sum = 0.0;
  for (int64_t k = 0; k < count; ++k) sum += fast_exp(x[columns[k]] * scale - shift - top);
  return static_cast<float>(top + std::log(sum));
}

}  // namespace

}  // namespace kdfast_cpu

namespace kdfast_cpu {

// Per row, with x = z / T_s: lse = log sum exp(x), q = exp(x - lse); the teacher's lse at T_t and its rest
// log P_r = log (sum over its unmatched columns) - log (sum over all); the student's log Q_r the same way. The KL is
// sum_k P_k (log P_k - log q_k) + P_r (log P_r - log Q_r), with sum_k P_k log P_k summed in the teacher's vector pass
// (a column mask) and sum_k P_k log q_k = sum_k P_k x_(s_k) - lse sum_k P_k by one gather loop, the only per-id work.
// Its gradient is (q_j - target_j) / T with target_j = P_k at a matched column and exp(x_j - lse_r + log P_r) at an
// unmatched one (P_r q_j / Q_r without the ratio, which overflows when Q_r underflows). Every read after a row's
// first is of cache-hot memory: each model's row is read from memory once and the gradient written once.
void mapped_kl_rows_cpu(const MappedKlArgs& a, int64_t begin, int64_t end) {
  const MappedColumns& m = a.map;
  const float inv_student = 1.0f / m.student_temperature, inv_teacher = 1.0f / m.teacher_temperature;
  const int64_t width = m.student_width, vector_end = width - width % kLanes;
  const int64_t teacher_width = m.teacher_width, teacher_vector_end = teacher_width - teacher_width % kLanes;
  const bool tempered = m.student_temperature != 1.0f;
  thread_local std::vector<float> teacher_exp, teacher_matched, student_probs, student_probs_one;
  teacher_exp.resize(teacher_width);
  teacher_matched.resize(m.matched);
  for (int64_t row = begin; row < end; ++row) {
    const float* z = m.student_logits + row * width;
    const float* t = m.teacher_logits + row * teacher_width;
    float* parts = a.parts + row * a.part_columns;
    float* grad = a.grad != nullptr ? a.grad + row * width : nullptr;
    for (int64_t c = 0; c < a.part_columns; ++c) parts[c] = 0.0f;
    const int64_t label = a.labels != nullptr ? a.labels[row] : -1;
    if (a.labels != nullptr && label == a.ignore_index) {
      if (grad != nullptr) std::fill(grad, grad + width, 0.0f);
      continue;
    }
    // The student at T: lse, entropy, and its mass on the unmatched columns (masked, no gather).
    const float top = row_max_scaled(z, width, inv_student);
    VFloat sum_lanes = splat<VFloat>(0.0f), weighted_lanes = splat<VFloat>(0.0f), rest_lanes = splat<VFloat>(0.0f);
    for (int64_t j = 0; j < vector_end; j += kLanes) {
      const VFloat x = load<VFloat>(z + j) * inv_student - top;
      const VFloat e = fast_exp(x);
      sum_lanes += e;
      weighted_lanes += e * x;
      rest_lanes += e * load<VFloat>(a.student_rest_mask + j);
    }
    double sum = horizontal_sum(sum_lanes), weighted = horizontal_sum(weighted_lanes);
    double rest = horizontal_sum(rest_lanes);
    for (int64_t j = vector_end; j < width; ++j) {
      const float x = z[j] * inv_student - top;
      const float e = fast_exp(x);
      sum += e;
      weighted += static_cast<double>(e) * x;
      rest += e * a.student_rest_mask[j];
    }
    const float lse = static_cast<float>(top + std::log(sum));
    parts[4] = static_cast<float>(std::log(sum) - weighted / sum);
    // A student rest below exp(-87) of its largest probability underflows the masked sum: gathered then, exactly.
    const float student_rest_lse = rest > 0.0 ? static_cast<float>(top + std::log(rest))
                                              : gathered_log_sum_exp(z, m.rest_student, m.rest_student_count,
                                                                     inv_student, 0.0f);
    const float lse_one = tempered ? row_log_sum_exp(z, width, 1.0f) : lse;
    if (label >= 0) {
      parts[1] = lse_one - z[label];
      int64_t best = 0;  // the first column holding the largest logit, as torch.argmax picks it
      while (best < width - 1 && z[best] * inv_student != top) ++best;
      parts[3] = best == label ? 1.0f : 0.0f;
    }
    // The teacher at T_t: its exps kept (the gather loop reads them), its sums, its matched columns' sum P log P.
    const float teacher_top = row_max_scaled(t, teacher_width, inv_teacher);
    VFloat t_sum_lanes = splat<VFloat>(0.0f), t_rest_lanes = splat<VFloat>(0.0f), t_plogp_lanes = splat<VFloat>(0.0f);
    float* texp = teacher_exp.data();
    for (int64_t j = 0; j < teacher_vector_end; j += kLanes) {
      const VFloat x = load<VFloat>(t + j) * inv_teacher - teacher_top;
      const VFloat e = fast_exp(x);
      const VFloat rest_mask = load<VFloat>(a.teacher_rest_mask + j);
      store(texp + j, e);
      t_sum_lanes += e;
      t_rest_lanes += e * rest_mask;
      t_plogp_lanes += e * x * (1.0f - rest_mask);
    }
    double t_sum = horizontal_sum(t_sum_lanes), t_rest = horizontal_sum(t_rest_lanes);
    double t_plogp = horizontal_sum(t_plogp_lanes);
    for (int64_t j = teacher_vector_end; j < teacher_width; ++j) {
      const float x = t[j] * inv_teacher - teacher_top;
      const float e = fast_exp(x);
      texp[j] = e;
      t_sum += e;
      t_rest += e * a.teacher_rest_mask[j];
      t_plogp += static_cast<double>(e) * x * (1.0f - a.teacher_rest_mask[j]);
    }
    const double log_t_sum = std::log(t_sum);
    // A teacher rest below exp(-87) of its largest probability is no mass that counts: log P_r = -inf.
    const float log_rest = t_rest > 0.0 ? static_cast<float>(std::log(t_rest) - log_t_sum) : -INFINITY;
    const double matched_mass = (t_sum - t_rest) / t_sum;
    // sum_k P_k log P_k = sum_k (e_k / S)(x_k - log S) over the matched columns.
    const double matched_plogp = t_plogp / t_sum - log_t_sum * matched_mass;
    const float inv_t_sum = static_cast<float>(1.0 / t_sum);
    double paired = 0.0;  // sum_k P_k z_(s_k)
    for (int64_t k = 0; k < m.matched; ++k) {
      const float p = texp[m.matched_teacher[k]] * inv_t_sum;
      teacher_matched[k] = p;
      paired += static_cast<double>(p) * z[m.matched_student[k]];
    }
    const double log_student_rest = student_rest_lse - lse;  // log Q_r
    double kl = matched_plogp - (paired * inv_student - lse * matched_mass);
    if (log_rest > -INFINITY) kl += std::exp(static_cast<double>(log_rest)) * (log_rest - log_student_rest);
    parts[0] = static_cast<float>(kl);
    if (grad == nullptr) continue;
    const float kd = a.grad_scale * a.kd_scale * inv_student, ce = a.grad_scale * a.ce_weight;
    const float spread = log_rest - student_rest_lse;  // an unmatched column's target: exp(x_j + spread)
    const bool has_ce = label >= 0 && ce != 0.0f;
    student_probs.resize(width);
    if (tempered && has_ce) student_probs_one.resize(width);
    float* q = student_probs.data();
    float* q_one = tempered && has_ce ? student_probs_one.data() : q;  // softmax(z) at T = 1, for the CE
    for (int64_t j = 0; j < vector_end; j += kLanes) {
      const VFloat x = load<VFloat>(z + j) * inv_student;
      const VFloat qj = fast_exp(x - lse);
      store(q + j, qj);
      VFloat g = kd * (qj - fast_exp(x + spread));
      if (tempered && has_ce) {
        const VFloat q1 = fast_exp(load<VFloat>(z + j) - lse_one);
        store(q_one + j, q1);
        g += ce * q1;
      } else if (has_ce) {
        g += ce * qj;
      }
      store(grad + j, g);
    }
    for (int64_t j = vector_end; j < width; ++j) {
      const float x = z[j] * inv_student;
      q[j] = fast_exp(x - lse);
      if (tempered && has_ce) q_one[j] = fast_exp(z[j] - lse_one);
      grad[j] = kd * (q[j] - fast_exp(x + spread)) + (has_ce ? ce * q_one[j] : 0.0f);
    }
    for (int64_t k = 0; k < m.matched; ++k) {  // a matched column's target is the teacher's P_k
      const int64_t j = m.matched_student[k];
      grad[j] = kd * (q[j] - teacher_matched[k]) + (has_ce ? ce * q_one[j] : 0.0f);
    }
    if (has_ce) grad[label] -= ce;
  }
}

}  // namespace kdfast_cpu
