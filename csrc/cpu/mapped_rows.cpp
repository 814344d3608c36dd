// Method "mapped" under forward KL in one pass per row. The teacher's rest mass spread over the student's unmatched
// columns as the student spreads its own, target_j = P_r q_j / Q_r, makes the bucket KL a dense one: the rest's term
// is P_r log(P_r / Q_r) and the gradient q - target is the bucket KL's exactly (docs/DESIGN.md, "Teachers with
// another tokenizer", derives it). P_r and Q_r are summed over each side's own unmatched columns, never as 1 - sum(P_k), which cancels when
// they are small.
#include "mapped_rows.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
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
  for (int64_t j = 0; j < vector_end; j += kLanes) sum_lanes += fast_exp_centred(load<VFloat>(x + j) * scale - top);
  double sum = horizontal_sum(sum_lanes);
  for (int64_t j = vector_end; j < width; ++j) sum += fast_exp_centred(x[j] * scale - top);
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

// Columns of the paired-up sums and gathers: float lanes for at most this many vectors, then a double.
constexpr int64_t kFlushEvery = 32;

VInt load_columns(const int32_t* p) {
  VInt v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Lanes of base[column] where column >= 0, else 0: one gather instruction where the build has one.
VFloat gather_matched(const float* base, VInt column) {
#if defined(__AVX512F__)
  const __m512i index = reinterpret_cast<__m512i>(column);
  const __mmask16 matched = _mm512_cmpge_epi32_mask(index, _mm512_setzero_si512());
  return reinterpret_cast<VFloat>(_mm512_mask_i32gather_ps(_mm512_setzero_ps(), matched, index, base, 4));
#elif defined(__AVX2__)
  const __m256i index = reinterpret_cast<__m256i>(column);
  const __m256 matched = _mm256_castsi256_ps(_mm256_cmpgt_epi32(index, _mm256_set1_epi32(-1)));
  return reinterpret_cast<VFloat>(_mm256_mask_i32gather_ps(_mm256_setzero_ps(), base, index, matched, 4));
#else
  VFloat v;
  for (int lane = 0; lane < kLanes; ++lane) v[lane] = column[lane] >= 0 ? base[column[lane]] : 0.0f;
  return v;
#endif
}

// sum over the matched student columns j of teacher_exp[teacher_column[j]] * scale * z[j] (the forward-only pass).
double matched_dot(const float* teacher_exp, const float* z, const int32_t* teacher_column, int64_t width,
                   float scale) {
  const int64_t vector_end = width - width % kLanes;
  double total = 0.0;
  VFloat lanes = splat<VFloat>(0.0f);
  for (int64_t j = 0; j < vector_end; j += kLanes) {
    lanes += gather_matched(teacher_exp, load_columns(teacher_column + j)) * load<VFloat>(z + j);
    if ((j / kLanes) % kFlushEvery == kFlushEvery - 1) {
      total += horizontal_sum(lanes);
      lanes = splat<VFloat>(0.0f);
    }
  }
  total += horizontal_sum(lanes);
  for (int64_t j = vector_end; j < width; ++j) {
    if (teacher_column[j] >= 0) total += static_cast<double>(teacher_exp[teacher_column[j]]) * z[j];
  }
  return total * scale;
}

}  // namespace

}  // namespace kdfast_cpu

namespace kdfast_cpu {

// Per row, with x = z / T_s: lse = log sum exp(x), q = exp(x - lse); the teacher's lse at T_t and its rest
// log P_r = log (sum over its unmatched columns) - log (sum over all); the student's log Q_r the same way. The KL is
// sum_k P_k (log P_k - log q_k) + P_r (log P_r - log Q_r), with sum_k P_k log P_k summed in the teacher's vector pass
// (a column mask) and sum_k P_k log q_k = sum_k P_k x_(s_k) - lse sum_k P_k, whose gathers (the only per-id work) run
// in the gradient's vector pass. Its gradient is (q_j - target_j) / T with target_j = P_k at a matched column and
// P_r q_j / Q_r at an unmatched one (by the ratio while it is moderate, else exp(x_j - lse_r + log P_r): the ratio
// overflows when Q_r underflows). Every read after a row's first is of cache-hot memory: each model's row is read
// from memory once and the gradient written once.
void mapped_kl_rows_cpu(const MappedKlArgs& a, int64_t begin, int64_t end) {
  const MappedColumns& m = a.map;
  const float inv_student = 1.0f / m.student_temperature, inv_teacher = 1.0f / m.teacher_temperature;
  const int64_t width = m.student_width, vector_end = width - width % kLanes;
  const int64_t teacher_width = m.teacher_width, teacher_vector_end = teacher_width - teacher_width % kLanes;
  const bool tempered = m.student_temperature != 1.0f;
  // Each row's exps, kept in cache between its passes: the gradient's pass multiplies the student's by 1 / sum instead
  // of taking them again, and gathers the teacher's.
  thread_local std::vector<float> student_exp, teacher_exp;
  student_exp.resize(width);
  teacher_exp.resize(teacher_width);
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
    // The exp passes are compute, the max passes memory: while this row's exps are taken, the next row's logits are
    // prefetched into L2 (a line per vector), so that the two overlap instead of adding up.
    const bool ahead = row + 1 < end;
    const float* z_ahead = ahead ? z + width : z;
    const float* t_ahead = ahead ? t + teacher_width : t;
    // The student at T: lse, entropy, and its mass on the unmatched columns (masked, no gather).
    const float top = row_max_scaled(z, width, inv_student);
    VFloat sum_lanes = splat<VFloat>(0.0f), weighted_lanes = splat<VFloat>(0.0f), rest_lanes = splat<VFloat>(0.0f);
    for (int64_t j = 0; j < vector_end; j += kLanes) {
      __builtin_prefetch(z_ahead + j, 0, 2);
      const VFloat x = load<VFloat>(z + j) * inv_student - top;
      const VFloat e = fast_exp_centred(x);
      store(student_exp.data() + j, e);
      sum_lanes += e;
      weighted_lanes += e * x;
      rest_lanes += e * load<VFloat>(a.student_rest_mask + j);
    }
    double sum = horizontal_sum(sum_lanes), weighted = horizontal_sum(weighted_lanes);
    double rest = horizontal_sum(rest_lanes);
    for (int64_t j = vector_end; j < width; ++j) {
      const float x = z[j] * inv_student - top;
      const float e = fast_exp_centred(x);
      student_exp[j] = e;
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
      __builtin_prefetch(t_ahead + j, 0, 2);
      const VFloat x = load<VFloat>(t + j) * inv_teacher - teacher_top;
      const VFloat e = fast_exp_centred(x);
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
      const float e = fast_exp_centred(x);
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
    const double log_student_rest = student_rest_lse - lse;  // log Q_r
    const auto finish_kl = [&](double paired) {  // paired = sum_k P_k z_(s_k)
      double kl = matched_plogp - (paired * inv_student - lse * matched_mass);
      if (log_rest > -INFINITY) kl += std::exp(static_cast<double>(log_rest)) * (log_rest - log_student_rest);
      parts[0] = static_cast<float>(kl);
    };
    if (grad == nullptr) {
      finish_kl(matched_dot(texp, z, a.teacher_column, width, inv_t_sum));
      continue;
    }
    const float kd = a.grad_scale * a.kd_scale * inv_student, ce = a.grad_scale * a.ce_weight;
    // An unmatched column's target P_r q_j / Q_r is q_j times the ratio while the ratio is moderate; past e^20 it is
    // exp(x_j + spread) (the ratio overflows when Q_r underflows, and q_j flushes to 0 first where the target may
    // not). A teacher rest of 0 is ratio 0.
    const double log_ratio = static_cast<double>(log_rest) - log_student_rest;
    const bool by_ratio = log_ratio < 20.0;
    const float ratio = by_ratio ? static_cast<float>(std::exp(log_ratio)) : 0.0f;
    const float spread = log_rest - student_rest_lse;
    const bool has_ce = label >= 0 && ce != 0.0f;
    // One pass writes every column's gradient: a matched column's target is the teacher's P_k (gathered from the
    // kept exps), an unmatched one's the rest spread as the student spreads its own; sum_k P_k z_(s_k) on the way.
    const float* sexp = student_exp.data();
    const float inv_sum = static_cast<float>(1.0 / sum);
    double paired = 0.0;
    VFloat paired_lanes = splat<VFloat>(0.0f);
    for (int64_t j = 0; j < vector_end; j += kLanes) {
      const VFloat zj = load<VFloat>(z + j), x = zj * inv_student;
      const VFloat qj = load<VFloat>(sexp + j) * inv_sum;
      const VInt column = load_columns(a.teacher_column + j);
      const VFloat p = gather_matched(texp, column) * inv_t_sum;
      paired_lanes += p * zj;
      const VFloat rest_target = by_ratio ? qj * ratio : fast_exp(x + spread);
      VFloat g = kd * (qj - (column >= 0 ? p : rest_target));
      if (has_ce) g += ce * (tempered ? fast_exp(zj - lse_one) : qj);
      store(grad + j, g);
      if ((j / kLanes) % kFlushEvery == kFlushEvery - 1) {  // float lanes summed into a double every few hundred
        paired += horizontal_sum(paired_lanes);
        paired_lanes = splat<VFloat>(0.0f);
      }
    }
    paired += horizontal_sum(paired_lanes);
    for (int64_t j = vector_end; j < width; ++j) {
      const float x = z[j] * inv_student, qj = sexp[j] * inv_sum;
      const int32_t column = a.teacher_column[j];
      float target = by_ratio ? qj * ratio : fast_exp(x + spread);
      if (column >= 0) {
        target = texp[column] * inv_t_sum;
        paired += static_cast<double>(target) * z[j];
      }
      grad[j] = kd * (qj - target) + (has_ce ? ce * (tempered ? fast_exp(z[j] - lse_one) : qj) : 0.0f);
    }
    finish_kl(paired);
    if (has_ce) grad[label] -= ce;
  }
}

}  // namespace kdfast_cpu
