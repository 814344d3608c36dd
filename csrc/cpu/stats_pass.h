// A vocab shard's STATS phase on the CPU (docs/DESIGN.md, "Shards and phases"): a row's log-sum-exps in one read of
// the row. Each block of it is loaded into L1 and its lane-wise max taken first; the lanes' running references move
// only when a block holds a larger logit (rare once a row is under way), so every element costs one exponential per
// sum, and the row is read from memory once (the fused kernel's separate max pass reads it twice).
#pragma once

#include <algorithm>

#include "row_math.h"

namespace kdfast_cpu {

constexpr int64_t kStatsBlock = 16 * kLanes;  // elements per block: 1 KiB of float32 at AVX-512

// CE's sum at T = 1 beside a tempered one: none, the squares of the tempered exps (T = 2), or its own exps.
enum StatsCe : int { kStatsNoCe = 0, kStatsSquares = 1, kStatsOwn = 2 };

// One array's running sums, lane by lane, each lane against its own running max.
struct LaneSums {
  VFloat m = splat<VFloat>(-INFINITY), z{}, z_ce{};

  template <int kCe>
  void raise_to(VFloat block_max, float inv_t) {
    if (!any_lane(block_max > m)) return;
    const VFloat m_new = block_max > m ? block_max : m;
    const VFloat scale = m == m_new ? splat<VFloat>(1.0f) : fast_exp_centred((m - m_new) * inv_t);
    z *= scale;
    if constexpr (kCe == kStatsSquares) z_ce *= scale * scale;
    if constexpr (kCe == kStatsOwn) z_ce *= m == m_new ? splat<VFloat>(1.0f) : fast_exp_centred(m - m_new);
    m = m_new;
  }

  VFloat reference() const { return m == -INFINITY ? splat<VFloat>(0.0f) : m; }

  template <int kCe>
  void add(VFloat v, VFloat ref, float inv_t) {
    const VFloat e = fast_exp_centred((v - ref) * inv_t);
    z += e;
    if constexpr (kCe == kStatsSquares) z_ce += e * e;
    if constexpr (kCe == kStatsOwn) z_ce += fast_exp_centred(v - ref);
  }

  // [log sum exp(x / T), log sum exp(x)] with the scalar tail x[full, vocab), against one reference: the max.
  template <int kCe>
  void finish(const float* x, int64_t full, int64_t vocab, float inv_t, float* lse, float* lse_ce) const {
    float top = horizontal_max(m);
    for (int64_t k = full; k < vocab; ++k) top = x[k] > top ? x[k] : top;
    const float ref = top == -INFINITY ? 0.0f : top;
    float total = 0.0f, total_ce = 0.0f;
    for (int lane = 0; lane < kLanes; ++lane) {
      if (z[lane] == 0.0f) continue;  // a lane that met only -inf
      const float shift = m[lane] - ref;
      total += z[lane] * std::exp(shift * inv_t);
      if constexpr (kCe == kStatsSquares) total_ce += z_ce[lane] * std::exp(2.0f * shift * inv_t);
      if constexpr (kCe == kStatsOwn) total_ce += z_ce[lane] * std::exp(shift);
    }
    for (int64_t k = full; k < vocab; ++k) {
      const float e = std::exp((x[k] - ref) * inv_t);
      total += e;
      if constexpr (kCe == kStatsSquares) total_ce += e * e;
      if constexpr (kCe == kStatsOwn) total_ce += std::exp(x[k] - ref);
    }
    *lse = ref * inv_t + std::log(total);
    if (lse_ce != nullptr) *lse_ce = ref + std::log(total_ce);
  }
};

// The student's sums (with CE's, kCe) and, when t is given, the teacher's, block by block over both rows.
template <int kCe>
void row_log_sum_exps(const float* s, const float* t, int64_t vocab, float inv_t, float* out) {
  LaneSums student, teacher;
  const int64_t full = vocab / kLanes * kLanes;
  for (int64_t j = 0; j < full; j += kStatsBlock) {
    const int64_t end = std::min(j + kStatsBlock, full);
    VFloat s_max = splat<VFloat>(-INFINITY), t_max = splat<VFloat>(-INFINITY);
    for (int64_t k = j; k < end; k += kLanes) {
      const VFloat v = load<VFloat>(s + k);
      s_max = v > s_max ? v : s_max;
      if (t != nullptr) {
        const VFloat w = load<VFloat>(t + k);
        t_max = w > t_max ? w : t_max;
      }
    }
    student.raise_to<kCe>(s_max, inv_t);
    const VFloat s_ref = student.reference();
    if (t == nullptr) {
      for (int64_t k = j; k < end; k += kLanes) student.add<kCe>(load<VFloat>(s + k), s_ref, inv_t);
      continue;
    }
    teacher.raise_to<kStatsNoCe>(t_max, inv_t);
    const VFloat t_ref = teacher.reference();
    for (int64_t k = j; k < end; k += kLanes) {
      student.add<kCe>(load<VFloat>(s + k), s_ref, inv_t);
      teacher.add<kStatsNoCe>(load<VFloat>(t + k), t_ref, inv_t);
    }
  }
  student.finish<kCe>(s, full, vocab, inv_t, &out[0], kCe == kStatsNoCe ? nullptr : &out[2]);
  if (t != nullptr) teacher.finish<kStatsNoCe>(t, full, vocab, inv_t, &out[1], nullptr);
}

// Out: [log sum exp(s / T), log sum exp(t / T), log sum exp(s), 0] (0 for what the settings do not use; the last
// column is SUMS' alone).
inline void stats_row(const float* s, const float* t, const DistillArgs& a, float* out) {
  out[0] = out[1] = out[2] = out[3] = 0.0f;
  if (!a.has_kd) {  // CE alone: its sum at T = 1 is the "tempered" one
    row_log_sum_exps<kStatsNoCe>(s, nullptr, a.vocab, 1.0f, out);
    out[2] = a.has_ce ? out[0] : 0.0f;
    out[0] = 0.0f;
    return;
  }
  if (!a.has_ce || a.temperature_power == 1) {
    row_log_sum_exps<kStatsNoCe>(s, t, a.vocab, a.inv_temperature, out);
    out[2] = a.has_ce ? out[0] : 0.0f;  // T = 1: the same sum
  } else if (a.temperature_power == 2) {
    row_log_sum_exps<kStatsSquares>(s, t, a.vocab, a.inv_temperature, out);
  } else {
    row_log_sum_exps<kStatsOwn>(s, t, a.vocab, a.inv_temperature, out);
  }
}

}  // namespace kdfast_cpu
