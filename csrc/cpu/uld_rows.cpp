// ULD and GOLD's hybrid, a row at a time; the sorted L1 is sorted_l1.cpp's (most values bucketed, not sorted).
//
// Per row: sigma = softmax(z / T) and the entropy; q = m sigma (m: a merged group's factor); g_j = d loss / d q_j (the
// sign of q_j - p at j's rank for the sorted L1; the divergence's derivative on matched columns); then the softmax's
// chain rule, d loss / d z_i = m sigma_i (g_i - sum_j g_j sigma_j) / T. Every elementwise step is float, every sum
// double: the terms of a row span many orders of magnitude.
#include "uld_rows.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "simd_math.h"
#include "sorted_l1.h"

namespace kdfast_cpu {
namespace {

constexpr float kProbabilityFloor = 1e-8f;  // GOLD's clamp of the matched probabilities

struct RowScratch {
  std::vector<float> sigma, g, pairs, student_values, teacher_values, rest_grad;
  SortedL1Scratch sorted;
  void reserve(int64_t student_width) {
    for (auto* v : {&sigma, &g}) v->resize(student_width);
  }
};

// The sorted L1 of q at `student_columns` (all when null) and p at `teacher_columns`; g_j = its subgradient at each
// of those student columns, times `weight`. A whole unmerged row is read in place; a part, or a merged group's
// m * sigma, is gathered first.
double sorted_l1_part(RowScratch& w, const float* p, float m, const int64_t* student_columns, int64_t student_count,
                      const int64_t* teacher_columns, int64_t teacher_count, float weight) {
  const float* q = w.sigma.data();
  if (student_columns != nullptr || m != 1.0f) {
    w.student_values.resize(student_count);
    for (int64_t k = 0; k < student_count; ++k) {
      w.student_values[k] = m * w.sigma[student_columns != nullptr ? student_columns[k] : k];
    }
    q = w.student_values.data();
  }
  if (teacher_columns != nullptr) {
    w.teacher_values.resize(teacher_count);
    for (int64_t k = 0; k < teacher_count; ++k) w.teacher_values[k] = p[teacher_columns[k]];
    p = w.teacher_values.data();
  }
  if (student_columns == nullptr) return sorted_l1(w.sorted, q, student_count, p, teacher_count, weight, w.g.data());
  w.rest_grad.resize(student_count);
  const double total = sorted_l1(w.sorted, q, student_count, p, teacher_count, weight, w.rest_grad.data());
  for (int64_t k = 0; k < student_count; ++k) w.g[student_columns[k]] = w.rest_grad[k];
  return total;
}

// log x for probabilities x in [1e-8, 1], vectorised: -log(1 / x) by simd_math.h's log on [1, 2^126), about 2 ulp.
// A libm call per matched element had made the hybrid's matched part twice the sort's time.
template <typename F>
inline F log_probability(F x) {
  return -fast_log_ge1(1.0f / x);
}

void log_probabilities(const float* x, float* out, int64_t n) {
  const int64_t vector_end = n - n % kLanes;
  for (int64_t k = 0; k < vector_end; k += kLanes) store(out + k, log_probability(load<VFloat>(x + k)));
  for (int64_t k = vector_end; k < n; ++k) out[k] = log_probability(x[k]);
}

// GOLD's divergence on the matched columns (every probability floored at 1e-8, unrenormalised) and its derivative
// with respect to each q_j, times `weight`, into g. d/da of the floored terms is 0 where the floor holds. The pairs
// are gathered into contiguous scratch once (s, t, log s: log m + z / T - lse, no log taken), so that the logs of t
// and of the mixture run vectorised.
double matched_divergence(const UldRowsArgs& a, RowScratch& w, const float* z, const float* p, float m,
                          float log_m_minus_lse) {
  const int64_t count = a.matched;
  const float beta = a.beta, log_floor = std::log(kProbabilityFloor);
  w.pairs.resize(5 * count);
  float* s = w.pairs.data();
  float* t = s + count;
  float* log_s = t + count;
  float* log_t = log_s + count;
  float* log_mix = log_t + count;
  for (int64_t k = 0; k < count; ++k) {
    const int64_t j = a.matched_student[k];
    const float raw = m * w.sigma[j];
    const bool floored = !(raw > kProbabilityFloor);
    s[k] = floored ? kProbabilityFloor : raw;
    log_s[k] = floored ? log_floor : z[j] * a.inv_temperature + log_m_minus_lse;
    t[k] = std::max(p[a.matched_teacher[k]], kProbabilityFloor);
  }
  log_probabilities(t, log_t, count);
  const bool jsd = a.divergence == MatchedDivergence::kJsd;
  if (jsd) {
    for (int64_t k = 0; k < count; ++k) log_mix[k] = (1.0f - beta) * s[k] + beta * t[k];
    log_probabilities(log_mix, log_mix, count);
  }
  double total = 0.0;
  for (int64_t k = 0; k < count; ++k) {
    float term, derivative;
    if (a.divergence == MatchedDivergence::kForwardKl) {
      term = t[k] * (log_t[k] - log_s[k]);
      derivative = -t[k] / s[k];
    } else if (a.divergence == MatchedDivergence::kReverseKl) {
      term = s[k] * (log_s[k] - log_t[k]);
      derivative = log_s[k] - log_t[k] + 1.0f;
    } else {
      term = beta * t[k] * (log_t[k] - log_mix[k]) + (1.0f - beta) * s[k] * (log_s[k] - log_mix[k]);
      derivative = (1.0f - beta) * (log_s[k] - log_mix[k]);  // the t- and mix-terms cancel
    }
    total += term;
    const int64_t j = a.matched_student[k];
    // s[k] is m sigma_j floored: above the floor exactly where m sigma_j is (no second gather of sigma).
    w.g[j] = s[k] > kProbabilityFloor ? a.matched_weight * derivative : 0.0f;
  }
  return total;
}

// sum_j g_j sigma_j: float products summed in kLanes double lanes (one chain of double adds, an add's latency per
// element, had been 14% of the pass's perf samples in a hybrid call).
double dot_in_double(const float* g, const float* sigma, int64_t width) {
  typedef double VDouble __attribute__((vector_size(kLanes * sizeof(double))));
  const int64_t vector_end = width - width % kLanes;
  VDouble lanes = {};
  for (int64_t j = 0; j < vector_end; j += kLanes) {
    lanes += __builtin_convertvector(load<VFloat>(g + j) * load<VFloat>(sigma + j), VDouble);
  }
  double total = 0.0;
  for (int lane = 0; lane < kLanes; ++lane) total += lanes[lane];
  for (int64_t j = vector_end; j < width; ++j) total += static_cast<double>(g[j] * sigma[j]);
  return total;
}

// sigma = softmax(z / T) into `sigma` by the vectorised exp of simd_math.h (the scalar std::exp made the softmax as
// slow as the sort); the row's entropy; returns log sum exp(z / T).
float softmax_row(const float* z, int64_t width, float inv_temperature, float* sigma, float* entropy) {
  const int64_t vector_end = width - width % kLanes;
  const float top = row_max_scaled(z, width, inv_temperature);
  VFloat total_lanes = splat<VFloat>(0.0f), weighted_lanes = splat<VFloat>(0.0f);
  for (int64_t j = 0; j < vector_end; j += kLanes) {
    const VFloat x = load<VFloat>(z + j) * inv_temperature - top;
    const VFloat e = fast_exp_centred(x);
    store(sigma + j, e);
    total_lanes += e;
    weighted_lanes += e * x;
  }
  double total = horizontal_sum(total_lanes), weighted = horizontal_sum(weighted_lanes);
  for (int64_t j = vector_end; j < width; ++j) {
    const float x = z[j] * inv_temperature - top;
    const float e = fast_exp_centred(x);
    sigma[j] = e;
    total += e;
    weighted += static_cast<double>(e) * x;
  }
  const float inv_total = static_cast<float>(1.0 / total);
  for (int64_t j = 0; j < vector_end; j += kLanes) store(sigma + j, load<VFloat>(sigma + j) * inv_total);
  for (int64_t j = vector_end; j < width; ++j) sigma[j] *= inv_total;
  // H = -sum sigma (x - log total) with x = z / T - top: log total - sum(sigma x).
  *entropy = static_cast<float>(std::log(total) - weighted / total);
  return static_cast<float>(top + std::log(total));
}

}  // namespace

void uld_rows_cpu(const UldRowsArgs& a, int64_t begin, int64_t end) {
  thread_local RowScratch w;
  w.reserve(a.student_width);
  const int64_t width = a.student_width;
  for (int64_t row = begin; row < end; ++row) {
    const float* z = a.student_logits + row * width;
    const float row_scale = a.row_scale != nullptr ? a.row_scale[row] : 1.0f;
    if (row_scale == 0.0f) {  // an ignored row: no loss, no gradient, no work
      a.loss[row] = a.entropy[row] = 0.0f;
      if (a.split != nullptr) a.split[2 * row] = a.split[2 * row + 1] = 0.0f;
      if (a.grad != nullptr && !a.accumulate) std::fill(a.grad + row * width, a.grad + (row + 1) * width, 0.0f);
      if (a.mass_grad != nullptr) a.mass_grad[row] = 0.0f;
      continue;
    }
    const float* p = a.teacher_probs + row * a.teacher_width;
    const float log_total = softmax_row(z, width, a.inv_temperature, w.sigma.data(), &a.entropy[row]);
    const float m = a.student_log_mass != nullptr ? std::exp(a.student_log_mass[row]) : 1.0f;
    double loss;
    if (a.matched_student == nullptr) {
      loss = sorted_l1_part(w, p, m, nullptr, width, nullptr, a.teacher_width, 1.0f);
    } else {
      const float log_m = a.student_log_mass != nullptr ? a.student_log_mass[row] : 0.0f;
      const double matched = matched_divergence(a, w, z, p, m, log_m - log_total);
      double rest = 0.0;
      if (a.rest_student_count > 0 && a.rest_teacher_count > 0) {
        rest = sorted_l1_part(w, p, m, a.rest_student, a.rest_student_count, a.rest_teacher, a.rest_teacher_count,
                              a.rest_weight);
      } else {
        for (int64_t k = 0; k < a.rest_student_count; ++k) w.g[a.rest_student[k]] = 0.0f;
      }
      loss = a.matched_weight * matched + a.rest_weight * rest;
      // The two parts before their weights, for logging (GOLD logs them): they are at hand, the sum drops them.
      if (a.split != nullptr) {
        a.split[2 * row] = static_cast<float>(matched);
        a.split[2 * row + 1] = static_cast<float>(rest);
      }
    }
    a.loss[row] = static_cast<float>(loss);
    if (a.grad == nullptr) continue;
    const double dot = dot_in_double(w.g.data(), w.sigma.data(), width);
    const float factor = a.grad_scale * row_scale * m * a.inv_temperature;
    const float centre = static_cast<float>(dot);
    float* out = a.grad + row * width;
    if (a.accumulate) {
      for (int64_t j = 0; j < width; ++j) out[j] += factor * w.sigma[j] * (w.g[j] - centre);
    } else {
      for (int64_t j = 0; j < width; ++j) out[j] = factor * w.sigma[j] * (w.g[j] - centre);
    }
    if (a.mass_grad != nullptr) a.mass_grad[row] = static_cast<float>(a.grad_scale * row_scale * m * dot);
  }
}

}  // namespace kdfast_cpu
