// Per row, one pass over each teacher's row and one over the mixture:
//   pass 1  each teacher's max and its exps e_j = exp((t_j - max) / T) into a per-thread scratch row (centred before
//           the temperature divides: |t| / T may be ~1e4, and t / T - max / T would round every log-probability by
//           that much), their sum z, and the factor w_m / z
//   pass 2  out_j = T * log sum_m (w_m / z_m) e_mj: no exp, one log. Where that sum is below float32's normal range
//           (every teacher's entry underflowed), the block takes the log-sum-exp of log w_m - log z_m + (t - max) / T
//           instead, never the log of an underflowed sum (-inf there would make reverse KL infinite).
#include "mix_kernel.h"

#include <cmath>
#include <vector>

#include "row_math.h"
#include "simd_math.h"

namespace kdfast_cpu {
namespace {

// Below this a mixture's probability is recomputed as a log-sum-exp: 1 / it stays in fast_log_ge1's range.
constexpr float kSmallestSum = 1e-30f;

template <typename F>
F log_sum_exp_of_terms(const float* const* rows, const float* maxima, const float* offsets, int64_t count,
                       int64_t j, float inv_t) {
  F terms[kMaxTeachers];
  F hi = splat<F>(-INFINITY);
  for (int64_t m = 0; m < count; ++m) {
    terms[m] = (load<F>(rows[m] + j) - maxima[m]) * inv_t + offsets[m];
    hi = terms[m] > hi ? terms[m] : hi;
  }
  F total{};
  for (int64_t m = 0; m < count; ++m) total += fast_exp(terms[m] - hi);
  const F result = hi + fast_log_ge1(total);
  return hi == -INFINITY ? hi : result;  // no teacher has mass here: -inf, not NaN
}

bool any_lane(bool value) { return value; }
template <typename Mask>
bool any_lane(Mask mask) {
  for (int lane = 0; lane < kLanes; ++lane)
    if (mask[lane]) return true;
  return false;
}

}  // namespace

void mix_rows_cpu(const MixArgs& a, int64_t begin, int64_t end) {
  const float inv_t = 1.0f / a.temperature;
  const int64_t count = a.teacher_count;
  thread_local std::vector<float> scratch;
  scratch.resize(static_cast<size_t>(count * a.columns));
  for (int64_t row = begin; row < end; ++row) {
    const float* rows[kMaxTeachers];
    float maxima[kMaxTeachers], offsets[kMaxTeachers], factors[kMaxTeachers];
    for (int64_t m = 0; m < count; ++m) {
      const float* t = a.teachers[m] + row * a.teacher_stride;
      float* e = scratch.data() + m * a.columns;
      const float top = row_max(t, a.columns);
      VFloat sum_acc{};
      for_lanes(a.columns, [&](int64_t j, auto zero) {
        using F = decltype(zero);
        const F value = fast_exp((load<F>(t + j) - top) * inv_t);
        store(e + j, value);
        accumulate(sum_acc, value);
      });
      rows[m] = t;
      maxima[m] = top;
      const float log_weight = a.log_weights[row * count + m];
      // A row of -inf (no mass) or a zero weight: the teacher adds nothing.
      const bool counts = std::isfinite(top) && log_weight != -INFINITY;
      const float sum = horizontal_sum(sum_acc);
      offsets[m] = counts ? log_weight - std::log(sum) : -INFINITY;
      factors[m] = counts ? std::exp(log_weight) / sum : 0.0f;
    }
    float* out = a.out + row * a.columns;
    for_lanes(a.columns, [&](int64_t j, auto zero) {
      using F = decltype(zero);
      F total{};
      for (int64_t m = 0; m < count; ++m) total += load<F>(scratch.data() + m * a.columns + j) * factors[m];
      const auto small = total < kSmallestSum;
      F mixed = -fast_log_ge1(1.0f / (small ? splat<F>(1.0f) : total));
      if (any_lane(small)) {
        const F exact = log_sum_exp_of_terms<F>(rows, maxima, offsets, count, j, inv_t);
        mixed = small ? exact : mixed;
      }
      store(out + j, mixed * a.temperature);
    });
  }
}

}  // namespace kdfast_cpu
