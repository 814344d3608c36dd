// The target row of method "mapped" under forward KL: T_s log P_k at each matched student column and, at each of the
// student's unmatched columns, T_s log(P_r q_j / Q_r) = z_j + T_s (log P_r - log sum_rest exp(z / T_s)): the teacher's
// rest mass spread as the student spreads its own. The rest's KL term is then P_r log(P_r / Q_r) and the dense
// kernel's gradient q - target is the bucket algebra's (kdfast/cross_vocab_rows.py derives it). P_r is summed over the
// teacher's own unmatched columns, never 1 - sum(P_k), which cancels when it is small. One pass over the teacher's
// row for its log-sum-exp (vectorised), gathers for the rest.
#include "mapped_target.h"

#include <algorithm>
#include <cmath>

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

void mapped_target_rows_cpu(const MappedTargetArgs& a, int64_t begin, int64_t end) {
  const float inv_teacher = 1.0f / a.teacher_temperature, inv_student = 1.0f / a.student_temperature;
  // A teacher with no unmatched mass: a floor far below any log-prob, never -inf (0 * -inf in the kernel).
  const float log_floor = -1e30f / std::max(a.student_temperature, 1.0f);
  for (int64_t row = begin; row < end; ++row) {
    const float* t = a.teacher_logits + row * a.teacher_width;
    const float* z = a.student_logits + row * a.student_width;
    float* out = a.target + row * a.student_width;
    const float teacher_lse = row_log_sum_exp(t, a.teacher_width, inv_teacher);
    const float log_rest = std::max(gathered_log_sum_exp(t, a.rest_teacher, a.rest_teacher_count, inv_teacher,
                                                         teacher_lse), log_floor);
    for (int64_t k = 0; k < a.matched; ++k) {
      out[a.matched_student[k]] =
          a.student_temperature * std::max(t[a.matched_teacher[k]] * inv_teacher - teacher_lse, log_floor);
    }
    const float student_rest_lse = gathered_log_sum_exp(z, a.rest_student, a.rest_student_count, inv_student, 0.0f);
    const float shift = a.student_temperature * (log_rest - student_rest_lse);
    for (int64_t k = 0; k < a.rest_student_count; ++k) {
      const int64_t j = a.rest_student[k];
      out[j] = std::max(z[j] + shift, a.student_temperature * log_floor);
    }
  }
}

}  // namespace kdfast_cpu
