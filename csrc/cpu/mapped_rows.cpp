// Method "mapped" in one pass per row. Under forward KL the teacher's rest mass spread over the student's unmatched
// columns as the student spreads its own, target_j = P_r q_j / Q_r, makes the bucket KL a dense one: the rest's term
// is P_r log(P_r / Q_r) and the gradient q - target is the bucket KL's exactly (docs/DESIGN.md, "Teachers with
// another tokenizer", derives it). Every other divergence takes the sparse kernel's bucket algebra over the matched
// columns and one rest bucket a side, the teacher's log P gathered through the map (`divergence_row`). P_r and Q_r
// are summed over each side's own unmatched columns, never as 1 - sum(P_k), which cancels when they are small.
#include "mapped_rows.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "row_math.h"
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

// Columns of the paired-up sums and gathers: float lanes for at most this many vectors, then a double.
constexpr int64_t kFlushEvery = 32;

// Adds x[from, width) into a running max: the vectors an exp pass's loop did not reach, then the scalar tail.
void add_to_max(RunningMax& best, const float* x, int64_t from, int64_t width) {
  const int64_t vector_end = width - width % kLanes;
  for (int64_t j = from; j < vector_end; j += kLanes) best.add(load<VFloat>(x + j));
  for (int64_t j = std::max(from, vector_end); j < width; ++j) best.add(x[j]);
}

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

// kLanes byte flags as int lanes, by one widening load where the build has it (GCC's __builtin_convertvector
// from bytes extracted them one at a time): a column mask a quarter of a float mask's size.
VInt load_flags(const uint8_t* p) {
#if defined(__AVX512F__)
  return reinterpret_cast<VInt>(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__)
  return reinterpret_cast<VInt>(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
  VInt v;
  for (int lane = 0; lane < kLanes; ++lane) v[lane] = p[lane];
  return v;
#endif
}

// sum over the matched student columns j of teacher_exp[teacher_column[j]] * scale * z[j] (the forward-only pass,
// and the gradient's pass's rare row that met 0 * -inf): a -inf logit where the teacher's exp is 0 adds 0.
double matched_dot(const float* teacher_exp, const float* z, const int32_t* teacher_column, int64_t width,
                   float scale) {
  const int64_t vector_end = width - width % kLanes;
  double total = 0.0;
  VFloat lanes = splat<VFloat>(0.0f);
  for (int64_t j = 0; j < vector_end; j += kLanes) {
    lanes += weighted(gather_matched(teacher_exp, load_columns(teacher_column + j)), load<VFloat>(z + j));
    if ((j / kLanes) % kFlushEvery == kFlushEvery - 1) {
      total += horizontal_sum(lanes);
      lanes = splat<VFloat>(0.0f);
    }
  }
  total += horizontal_sum(lanes);
  for (int64_t j = vector_end; j < width; ++j) {
    const float p = teacher_column[j] >= 0 ? teacher_exp[teacher_column[j]] : 0.0f;
    if (p > 0.0f) total += static_cast<double>(p) * z[j];  // (a logit of -inf at p = 0 adds 0)
  }
  return total * scale;
}

// sum_j e_j x_j with x_j = y_j * scale - shift over the columns `rest` does not flag (null: every column), where
// e_j > 0: the rare row whose vector sum met 0 * -inf (a logit of -inf) is summed again this way.
double guarded_e_x_sum(const float* e, const float* y, int64_t width, float scale, float shift,
                       const uint8_t* rest) {
  double total = 0.0;
  for (int64_t j = 0; j < width; ++j) {
    if (e[j] > 0.0f && (rest == nullptr || rest[j] == 0)) {
      total += static_cast<double>(e[j]) * (y[j] * scale - shift);
    }
  }
  return total;
}

// The first of the student's matched columns holding their largest logit (-1: none matched), by lanes.
int64_t largest_matched(const float* z, const int32_t* teacher_column, int64_t width) {
  const int64_t vector_end = width - width % kLanes;
  VFloat best = splat<VFloat>(-INFINITY);
  VInt best_at = {}, at = {};
  for (int lane = 0; lane < kLanes; ++lane) at[lane] = lane, best_at[lane] = -1;
  for (int64_t j = 0; j < vector_end; j += kLanes, at += kLanes) {
    const VFloat zj = load<VFloat>(z + j);
    const VInt take = (load_columns(teacher_column + j) >= 0) & (zj > best);  // strictly: a lane keeps its first
    best = take ? zj : best;
    best_at = take ? at : best_at;
  }
  float top = -INFINITY;
  int64_t found = -1;
  for (int lane = 0; lane < kLanes; ++lane) {
    if (best_at[lane] >= 0 && (best[lane] > top || (best[lane] == top && best_at[lane] < found))) {
      top = best[lane], found = best_at[lane];
    }
  }
  for (int64_t j = vector_end; j < width; ++j) {
    if (teacher_column[j] >= 0 && z[j] > top) top = z[j], found = j;
  }
  return found;
}

// One row's two sides after their passes, in the units the buckets take (x = z / T_s, y = t / T_t).
struct MappedRow {
  const float* z;
  const float* t;
  const float* student_exp;  // exp(x - top), kept from the student's pass
  float top, log_sum;        // the student's largest x and log sum exp(x - top): log q = x - top - log_sum
  float teacher_shift;       // log P = y - teacher_shift at a matched column
  float log_q_rest, log_p_rest;  // the rest buckets (-inf: none)
  float lse_one;                 // log sum exp(z): CE's softmax at T = 1
};

// Every divergence but forward KL: the divergence over the K matched buckets and the rest, its gradient
// q_j (h_j - h_ref - D) at a matched column and q_j (h_r - h_ref - D) off the map, centred as the sparse kernel
// centres it on the student's largest bucket (h_ref), D = sum_b Q_b (h_b - h_ref). The scores are kept in `scores`
// between the buckets' pass and the gradient's, both over cache-hot rows. Returns the divergence.
__attribute__((flatten)) float divergence_row(const MappedArgs& a, const MappedRow& r, float* grad, int64_t label,
                                              std::vector<float>& scores) {
  const MappedColumns& m = a.map;
  const int64_t width = m.student_width, vector_end = width - width % kLanes;
  const float inv_student = 1.0f / m.student_temperature, inv_teacher = 1.0f / m.teacher_temperature;
  const MixtureConstants mc(a.beta, a.one_minus_beta);
  const int divergence = a.divergence;
  const auto log_q_at = [&](float zj) { return (zj * inv_student - r.top) - r.log_sum; };
  const auto log_p_at = [&](int32_t column) { return r.t[column] * inv_teacher - r.teacher_shift; };
  float rest_term, rest_h;
  const float q_rest = std::exp(r.log_q_rest);
  bucket_term_and_score<float>(divergence, mc, r.log_q_rest, r.log_p_rest, q_rest, rest_term, rest_h);
  // The centre: the student's largest bucket, its rest where that holds more than its largest matched column.
  const int64_t star = largest_matched(r.z, a.teacher_column, width);
  const float star_log_q = star >= 0 ? log_q_at(r.z[star]) : -INFINITY;
  float h_ref = rest_h;
  if (star >= 0 && !(r.log_q_rest > star_log_q)) {
    float star_term;
    bucket_term_and_score<float>(divergence, mc, star_log_q, log_p_at(a.teacher_column[star]), std::exp(star_log_q),
                                 star_term, h_ref);
  }
  const bool keep_scores = grad != nullptr;
  float* h_of = scores.data();
  const float inv_sum = std::exp(-r.log_sum);
  double kd = 0.0, d = 0.0;
  VFloat kd_lanes = splat<VFloat>(0.0f), d_lanes = splat<VFloat>(0.0f);
  for (int64_t j = 0; j < vector_end; j += kLanes) {
    const VInt column = load_columns(a.teacher_column + j);
    const VInt matched = column >= 0;
    const VFloat log_q = (load<VFloat>(r.z + j) * inv_student - r.top) - r.log_sum;
    const VFloat log_p = gather_matched(r.t, column) * inv_teacher - r.teacher_shift;  // (unmatched lanes: unused)
    const VFloat q = load<VFloat>(r.student_exp + j) * inv_sum;
    VFloat term, h;
    bucket_term_and_score<VFloat>(divergence, mc, log_q, log_p, q, term, h);
    kd_lanes += matched ? term : splat<VFloat>(0.0f);
    d_lanes += matched ? weighted(q, h - h_ref) : splat<VFloat>(0.0f);
    if (keep_scores) store(h_of + j, h - h_ref);
    if ((j / kLanes) % kFlushEvery == kFlushEvery - 1) {  // float lanes summed into a double every few hundred
      kd += horizontal_sum(kd_lanes), d += horizontal_sum(d_lanes);
      kd_lanes = d_lanes = splat<VFloat>(0.0f);
    }
  }
  kd += horizontal_sum(kd_lanes), d += horizontal_sum(d_lanes);
  for (int64_t j = vector_end; j < width; ++j) {
    const int32_t column = a.teacher_column[j];
    if (column < 0) continue;
    const float log_q = log_q_at(r.z[j]);
    float term, h;
    bucket_term_and_score<float>(divergence, mc, log_q, log_p_at(column), r.student_exp[j] * inv_sum, term, h);
    kd += term;
    d += weighted(r.student_exp[j] * inv_sum, h - h_ref);
    if (keep_scores) h_of[j] = h - h_ref;
  }
  kd += rest_term;  // (a student whose every column is matched: the teacher's rest against Q_r = 0)
  d += weighted(q_rest, rest_h - h_ref);
  if (grad == nullptr) return static_cast<float>(kd);
  const float row_d = static_cast<float>(d);
  const float rest_factor = q_rest > 0.0f ? rest_h - h_ref - row_d : 0.0f;  // no column off the map: unused
  const float kd_coef = a.grad_scale * a.kd_scale * inv_student, ce = a.grad_scale * a.ce_weight;
  const bool has_ce = label >= 0 && ce != 0.0f;
  const bool tempered = m.student_temperature != 1.0f;
  const float lse_one = r.lse_one;
  for (int64_t j = 0; j < vector_end; j += kLanes) {
    const VFloat zj = load<VFloat>(r.z + j);
    const VFloat q = load<VFloat>(r.student_exp + j) * inv_sum;
    const VInt matched = load_columns(a.teacher_column + j) >= 0;
    const VFloat factor = matched ? load<VFloat>(h_of + j) - row_d : splat<VFloat>(rest_factor);
    VFloat g = kd_coef * weighted(q, factor);
    if (has_ce) g += ce * (tempered ? fast_exp(zj - lse_one) : q);
    store(grad + j, g);
  }
  for (int64_t j = vector_end; j < width; ++j) {
    const float q = r.student_exp[j] * inv_sum;
    const float factor = a.teacher_column[j] >= 0 ? h_of[j] - row_d : rest_factor;
    grad[j] = kd_coef * weighted(q, factor) + (has_ce ? ce * (tempered ? fast_exp(r.z[j] - lse_one) : q) : 0.0f);
  }
  if (has_ce) grad[label] -= ce;
  return static_cast<float>(kd);
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
// from memory once and the gradient written once. Each row's max is taken beside the exps of the pass before it (the
// teacher's in the student's pass, the next row's student in the teacher's), from rows prefetched into L2 a pass
// earlier, rather than in passes of their own (8% fewer kernel samples on a Zen 5).
void mapped_rows_cpu(const MappedArgs& a, int64_t begin, int64_t end) {
  const MappedColumns& m = a.map;
  const float inv_student = 1.0f / m.student_temperature, inv_teacher = 1.0f / m.teacher_temperature;
  const int64_t width = m.student_width, vector_end = width - width % kLanes;
  const int64_t teacher_width = m.teacher_width, teacher_vector_end = teacher_width - teacher_width % kLanes;
  const bool tempered = m.student_temperature != 1.0f;
  // Each row's exps, kept in cache between its passes: the gradient's pass multiplies the student's by 1 / sum instead
  // of taking them again, and gathers the teacher's.
  thread_local std::vector<float> student_exp, teacher_exp, scores;
  student_exp.resize(width);
  teacher_exp.resize(teacher_width);
  if (a.divergence != kForwardKL) scores.resize(width);
  const int64_t both_vector_end = std::min(vector_end, teacher_vector_end);
  // The student's largest logit of the row `top_row`, taken during the previous row's teacher pass (max(z) / T_s is
  // max(z / T_s): rounding a product by a positive scale keeps the order).
  int64_t top_row = -1;
  float next_largest = -INFINITY;
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
    // The student at T: lse, entropy, and its mass on the unmatched columns (masked, no gather); the teacher row's
    // max beside them.
    const float largest = top_row == row ? next_largest : row_max_scaled(z, width, 1.0f);
    const float top = largest * inv_student;
    VFloat sum_lanes = splat<VFloat>(0.0f), weighted_lanes = splat<VFloat>(0.0f), rest_lanes = splat<VFloat>(0.0f);
    RunningMax teacher_max;
    const auto student_vector = [&](int64_t j) {
      __builtin_prefetch(z_ahead + j, 0, 2);
      const VFloat x = load<VFloat>(z + j) * inv_student - top;
      const VFloat e = fast_exp_centred(x);
      store(student_exp.data() + j, e);
      sum_lanes += e;
      weighted_lanes += e * x;
      rest_lanes += load_columns(a.teacher_column + j) < 0 ? e : splat<VFloat>(0.0f);
    };
    for (int64_t j = 0; j < both_vector_end; j += kLanes) {
      student_vector(j);
      teacher_max.add(load<VFloat>(t + j));
    }
    for (int64_t j = both_vector_end; j < vector_end; j += kLanes) student_vector(j);
    add_to_max(teacher_max, t, both_vector_end, teacher_width);
    double sum = horizontal_sum(sum_lanes), e_x_sum = horizontal_sum(weighted_lanes);
    double rest = horizontal_sum(rest_lanes);
    for (int64_t j = vector_end; j < width; ++j) {
      const float x = z[j] * inv_student - top;
      const float e = fast_exp_centred(x);
      student_exp[j] = e;
      sum += e;
      e_x_sum += static_cast<double>(e) * x;
      if (a.teacher_column[j] < 0) rest += e;
    }
    const float lse = static_cast<float>(top + std::log(sum));
    if (std::isnan(e_x_sum)) e_x_sum = guarded_e_x_sum(student_exp.data(), z, width, inv_student, top, nullptr);
    parts[4] = static_cast<float>(std::log(sum) - e_x_sum / sum);
    // log Q_r, the student's rest as a probability: at least float32's smallest normal, as the sparse algebra floors
    // it on every backend (kdfast/sparse_math.py, floored_rest), so that forward KL stays finite where the masked
    // sum underflows (fast_exp_centred is 0 below exp(-87.3)); a constant there, whose columns get no target.
    const bool has_rest = m.rest_student_count > 0;
    const float raw_log_q_rest = rest > 0.0 ? static_cast<float>(std::log(rest) - std::log(sum)) : -INFINITY;
    const bool rest_floored = has_rest && raw_log_q_rest <= kStudentRestFloorLog;
    const float log_q_rest = has_rest ? std::max(raw_log_q_rest, kStudentRestFloorLog) : -INFINITY;
    const float lse_one = tempered ? row_log_sum_exp(z, width, 1.0f) : lse;
    if (label >= 0) {
      parts[1] = lse_one - z[label];
      parts[3] = z[label] >= largest ? 1.0f : 0.0f;  // a tie counts, as LossComponents.accuracy says
    }
    // The teacher at T_t: its exps kept (the gather loop reads them), its sums, its matched columns' sum P log P; the
    // next row's student max beside them (that row was prefetched during this row's student pass).
    const float teacher_top = teacher_max.value() * inv_teacher;
    VFloat t_sum_lanes = splat<VFloat>(0.0f), t_rest_lanes = splat<VFloat>(0.0f), t_plogp_lanes = splat<VFloat>(0.0f);
    float* texp = teacher_exp.data();
    RunningMax student_max_ahead;
    const auto teacher_vector = [&](int64_t j) {
      __builtin_prefetch(t_ahead + j, 0, 2);
      const VFloat x = load<VFloat>(t + j) * inv_teacher - teacher_top;
      const VFloat e = fast_exp_centred(x);
      const VInt rest = load_flags(a.teacher_rest + j) != 0;
      store(texp + j, e);
      t_sum_lanes += e;
      t_rest_lanes += rest ? e : splat<VFloat>(0.0f);
      t_plogp_lanes += rest ? splat<VFloat>(0.0f) : e * x;
    };
    if (ahead) {
      for (int64_t j = 0; j < both_vector_end; j += kLanes) {
        teacher_vector(j);
        student_max_ahead.add(load<VFloat>(z_ahead + j));
      }
      for (int64_t j = both_vector_end; j < teacher_vector_end; j += kLanes) teacher_vector(j);
      add_to_max(student_max_ahead, z_ahead, both_vector_end, width);
      top_row = row + 1, next_largest = student_max_ahead.value();
    } else {
      for (int64_t j = 0; j < teacher_vector_end; j += kLanes) teacher_vector(j);
    }
    double t_sum = horizontal_sum(t_sum_lanes), t_rest = horizontal_sum(t_rest_lanes);
    double t_plogp = horizontal_sum(t_plogp_lanes);
    for (int64_t j = teacher_vector_end; j < teacher_width; ++j) {
      const float x = t[j] * inv_teacher - teacher_top;
      const float e = fast_exp_centred(x);
      texp[j] = e;
      t_sum += e;
      if (a.teacher_rest[j]) {
        t_rest += e;
      } else {
        t_plogp += static_cast<double>(e) * x;
      }
    }
    const double log_t_sum = std::log(t_sum);
    // A teacher rest below exp(-87) of its largest probability is no mass that counts: log P_r = -inf.
    const float log_rest = t_rest > 0.0 ? static_cast<float>(std::log(t_rest) - log_t_sum) : -INFINITY;
    if (a.divergence != kForwardKL) {
      // The rests floored as the sparse algebra floors them: the teacher's under reverse KL's logarithm, the
      // student's above (a student whose every column is matched has none).
      const double p_rest = a.divergence == kReverseKL ? std::max(t_rest / t_sum, kTeacherRestFloor) : t_rest / t_sum;
      const float log_sum = static_cast<float>(std::log(sum));
      MappedRow sides{z, t, student_exp.data(), top, log_sum, static_cast<float>(teacher_top + log_t_sum), log_q_rest,
                      p_rest > 0.0 ? static_cast<float>(std::log(p_rest)) : -INFINITY, lse_one};
      parts[0] = divergence_row(a, sides, grad, label, scores);
      continue;
    }
    if (std::isnan(t_plogp)) {  // forward KL's alone
      t_plogp = guarded_e_x_sum(texp, t, teacher_width, inv_teacher, teacher_top, a.teacher_rest);
    }
    const double matched_mass = (t_sum - t_rest) / t_sum;
    // sum_k P_k log P_k = sum_k (e_k / S)(x_k - log S) over the matched columns.
    const double matched_plogp = t_plogp / t_sum - log_t_sum * matched_mass;
    const float inv_t_sum = static_cast<float>(1.0 / t_sum);
    const double log_student_rest = log_q_rest;
    // A floored rest moves no logit: P_r leaves q_j's share sum(P), and the rest's columns get no target.
    const float q_share = rest_floored ? static_cast<float>(matched_mass) : 1.0f;
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
    // exp(x_j + spread) (the ratio overflows where Q_r is tiny, and q_j flushes to 0 first where the target may
    // not). A teacher rest of 0 is ratio 0, and so is a floored student rest (its columns' q_j are 0 too).
    const double log_ratio = static_cast<double>(log_rest) - log_student_rest;
    const bool by_ratio = rest_floored || log_ratio < 20.0;
    const float ratio = by_ratio && !rest_floored ? static_cast<float>(std::exp(log_ratio)) : 0.0f;
    const float spread = log_rest - (lse + log_q_rest);
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
      VFloat g = kd * (qj * q_share - (column >= 0 ? p : rest_target));
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
      grad[j] = kd * (qj * q_share - target) + (has_ce ? ce * (tempered ? fast_exp(z[j] - lse_one) : qj) : 0.0f);
    }
    // A -inf logit where P is 0 made its product 0 * -inf: the rare row is summed again, guarded.
    if (std::isnan(paired)) paired = matched_dot(texp, z, a.teacher_column, width, inv_t_sum);
    finish_kl(paired);
    if (has_ce) grad[label] -= ce;
  }
}

}  // namespace kdfast_cpu
