// What every CPU pass shares: the per-thread scratch rows, the lane loop, and the mixtures' per-element math.
// No torch headers: this file compiles with plain g++.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../common/kernel_abi.h"
#include "simd_math.h"

namespace kdfast_cpu {

using namespace kdfast;  // the divergence and phase codes

// Several teachers (mixture_row.h): the most teachers' shares a row keeps pending (their exps rows, not yet added into
// the mixture row), and the rows the last pass adds up (those and the mixture row of the shares folded before them).
constexpr int kMixPendingShares = 3;
constexpr int kMixLastRows = kMixPendingShares + 1;

// The rows a mixture's last pass adds up, each times its factor: the mixture row when shares were added into it
// (factor 1), then the pending shares, oldest first (the teachers' order, so that p_bar sums in one order however
// many teachers there are).
struct MixtureSum {
  const float* rows[kMixLastRows] = {};
  float factors[kMixLastRows] = {};
  int count = 0;
  void add(const float* row, float factor) { rows[count] = row, factors[count] = factor, ++count; }
  void drop_first() {
    for (int k = 1; k < count; ++k) rows[k - 1] = rows[k], factors[k - 1] = factors[k];
    --count;
  }
};

struct Scratch {
  std::vector<float> student, teacher, exp_student, exp_teacher, exp_ce;
  // several teachers (mixture_row.h): a ring of teachers' exps rows (the pending shares, and the one a pass writes),
  // a widened 16-bit row
  std::vector<float> mix_exps[kMixPendingShares + 1];
  std::vector<float> mix_widened;
  // several teachers: each one's forward KL but log z_s, or its whole reverse KL (mixture_row.h)
  float mix_own_kl[kMaxMixedTeachers];
  float mix_student_max;  // the student row's max, taken by mixture_row while it streams the teachers' rows
  // A mixture whose last sum and log are left to the kernel's exp pass (forward KL, mixture_row.h), and the rows p_bar
  // is the sum of there.
  bool mix_log_deferred = false;
  MixtureSum mix_last;
  // A row's student max and its teacher's (a mixture's first teacher's), taken by the exp pass of the row before it
  // beside its prefetches of that row (float32 rows), and the row they belong to (-1: none; each call's rows start
  // with none, so a row skipped or a call ended leaves nothing another row could take).
  int64_t next_row = -1;
  float next_student_max = 0.0f, next_teacher_max = 0.0f;
  // `mixing`: several teachers' rows too (only a mixture's rows read them)
  void reserve(int64_t vocab, bool mixing = false) {
    for (auto* buffer : {&student, &teacher, &exp_student, &exp_teacher, &exp_ce}) {
      if (static_cast<int64_t>(buffer->size()) < vocab) buffer->resize(vocab);
    }
    if (!mixing) return;
    for (auto& buffer : mix_exps) {
      if (static_cast<int64_t>(buffer.size()) < vocab) buffer.resize(vocab);
    }
    if (static_cast<int64_t>(mix_widened.size()) < vocab) mix_widened.resize(vocab);
  }
};

// 16-bit rows are widened into a scratch row once; float32 rows are read where they are.
template <typename T>
inline const float* widen_row(const T* row, int64_t vocab, std::vector<float>& out) {
  float* dst = out.data();
  int64_t j = 0;
  for (; j + kLanes <= vocab; j += kLanes) store(dst + j, load_wide(row + j));
  for (; j < vocab; ++j) dst[j] = to_float(row[j]);
  return dst;
}
inline const float* widen_row(const float* row, int64_t, std::vector<float>&) { return row; }

// The next row's logits, prefetched into L2 while this row computes: pass 0 is the only pass that reads
// memory, and without this it waits on DRAM while the core idles (measured: ~16% of the kernel).
struct NextRow {
  const char* student = nullptr;
  const char* teacher = nullptr;
  int student_element_bytes = 4, teacher_element_bytes = 4;
  int64_t row = -1;  // the next row's index
};

// How far ahead (floats) a pass asks for a row it reads from memory beside its own work (8 KiB: the fewest cycles
// of 2, 4, 8 and 16 KiB for the mixture's teacher passes on a Zen 5, 2048 x 32000, M = 3).
constexpr int64_t kPrefetchAhead = 2048;

template <typename GradT>
inline void zero_row(GradT* g, int64_t vocab) {
  for (int64_t j = 0; j < vocab; ++j) from_float(0.0f, &g[j]);
}

// Stores a block of a row's gradient (scalar or vector) from column j, with the CE's -label_coef added at the label's
// column when the block holds it: in float, before the one rounding to the gradient's dtype. Added to an entry
// already rounded to 16 bits, p - 1 cancels: a bf16 p of 0.99966 is 1.0, and the label's gradient came out 0 where
// it is -3.4e-4 (a confident model's every label). label < 0: none here.
template <typename GradT, typename F>
inline void store_grad_with_label(GradT* g, int64_t j, F value, int64_t label, float label_coef) {
  const int64_t lane = label - j;
  if (lane >= 0 && lane < static_cast<int64_t>(sizeof(F) / sizeof(float))) {
    if constexpr (std::is_same_v<F, float>) {
      value -= label_coef;
    } else {
      value[lane] -= label_coef;
    }
  }
  store_grad(g + j, value);
}

// Runs body(j, F{}) over a row: F = VFloat on full vector blocks, then F = float on the tail.
template <typename Body>
inline void for_lanes(int64_t vocab, Body&& body) {
  int64_t j = 0;
  for (; j + kLanes <= vocab; j += kLanes) body(j, VFloat{});
  for (; j < vocab; ++j) body(j, 0.0f);
}

// A row's sum in float lanes (the scalar tail adds into lane 0), folded into a double every kFoldEvery vectors: each
// lane then adds a few dozen terms in float, not a row's thousands (32000 columns: 2000 a lane at AVX-512's 16 lanes,
// 8000 at the 4 of a build without AVX2, as on ARM). Measured on 256 rows of 32000, worst row against float64: AVX-512
// 2.6e-6 before, 9.1e-7 after (reverse KL; TVD 5.2e-7 and 1.2e-7), the 4-lane build 7.5e-6 and 1.0e-6 (its TVD had
// missed Liger's rtol of 1e-6); the kernel's perf samples 1.1% more (two runs each, within their spread).
constexpr int kFoldEvery = 64;
struct LaneSum {
  VFloat lanes{};
  double folded = 0.0;
  int count = 0;
};
// Every kFoldEvery vectors the float lanes are summed into the double.
inline void count_and_fold(LaneSum& acc) {
  if (++acc.count == kFoldEvery) {
    acc.folded += horizontal_sum(acc.lanes);
    acc.lanes = VFloat{};
    acc.count = 0;
  }
}
inline void accumulate(LaneSum& acc, VFloat value) {
  acc.lanes += value;
  count_and_fold(acc);
}
inline void accumulate(LaneSum& acc, float value) { acc.lanes[0] += value; }
// accumulate(acc, weighted(prob, x)) as one masked FMA a vector where a zero probability's lane keeps its sum (the
// compare, a zeroing multiply and an add were three instructions).
inline void accumulate_weighted(LaneSum& acc, VFloat prob, VFloat x) {
  acc.lanes = prob != 0.0f ? prob * x + acc.lanes : acc.lanes;
  count_and_fold(acc);
}
inline void accumulate_weighted(LaneSum& acc, float prob, float x) {
  if (prob != 0.0f) acc.lanes[0] += prob * x;
}
inline float horizontal_sum(const LaneSum& acc) { return static_cast<float>(acc.folded + horizontal_sum(acc.lanes)); }

// A row's max taken block by block (vector lanes, then the scalar tail), alone or beside another pass's work.
struct RunningMax {
  VFloat lanes = splat<VFloat>(-INFINITY);
  float tail = -INFINITY;
  void add(VFloat v) { lanes = v > lanes ? v : lanes; }
  void add(float v) { tail = v > tail ? v : tail; }
  float value() const {
    const float head = horizontal_max(lanes);
    return head > tail ? head : tail;
  }
};

inline float row_max(const float* x, int64_t vocab) {
  RunningMax best;
  for_lanes(vocab, [&](int64_t j, auto zero) {
    using F = decltype(zero);
    best.add(load<F>(x + j));
  });
  return best.value();
}

// sum_j (x_j - ref): label smoothing's uniform part of the CE target (its mean logit, relative to ref).
inline float shifted_row_sum(const float* x, int64_t vocab, float ref) {
  LaneSum acc{};
  for_lanes(vocab, [&](int64_t j, auto zero) {
    using F = decltype(zero);
    accumulate(acc, load<F>(x + j) - ref);
  });
  return horizontal_sum(acc);
}

// The CE's target logit relative to ref: the label's (s_label - ref), or with label smoothing eps
// (1 - eps)(s_label - ref) + eps / V * sum_j (s_j - ref) over the whole vocabulary (`shifted_sum` covers this call's
// columns; a shard's partial sums add up over the ranks).
inline float ce_target_logit(const DistillArgs& a, float s_label_shifted, float shifted_sum) {
  if (a.label_smoothing == 0.0f) return s_label_shifted;
  return (1.0f - a.label_smoothing) * s_label_shifted +
         a.label_smoothing * shifted_sum / static_cast<float>(a.global_vocab);
}

inline int64_t first_index_of(const float* x, int64_t vocab, float value) {
  const int64_t found = first_index_scaled(x, vocab, 1.0f, value);  // x * 1 is x, NaN included
  return found < 0 ? 0 : found;
}

// 0 * (anything) = 0: a zero probability adds nothing even against a log of -inf.
template <typename F>
inline F weighted(F prob, F log_ratio) {
  return prob == 0.0f ? splat<F>(0.0f) : prob * log_ratio;
}

// A mixture's weights, beta and 1 - beta, each rounded to float from the host's double, and their logs, each from the
// smaller weight: 1 - beta in float from a float beta near 1 is off by up to 2^-25 absolute (19% at beta = 1 - 1e-7),
// and so is log(beta) there, or log(1 - beta) near 0, as the log of a float that rounded to 1.
struct MixtureConstants {
  float beta, one_minus_beta, log_beta, log_1m_beta;
  MixtureConstants(float b, float one_minus_b)
      : beta(b), one_minus_beta(one_minus_b),
        log_beta(b > 0.5f ? std::log1p(-one_minus_b) : (b > 0.0f ? std::log(b) : -INFINITY)),
        log_1m_beta(b < 0.5f ? std::log1p(-b) : (one_minus_b > 0.0f ? std::log(one_minus_b) : -INFINITY)) {}
};

// A mixture's loss term at one element and its score h = dL/dq (up to a constant, which centring removes), from
// x = log p - log q: log(m / q) and log(m / p) are log-sum-exps of x and a constant, exact in both limits of a
// near-one-hot row (no difference of two large log-probabilities). beta > 0 here (beta = 0 is a plain KL). The
// loops that call it per vector are `flatten`ed: GCC called it out of line there (its outputs through memory, a third
// of the mixture's own-divergence sweep's samples), while inlining it everywhere slowed the forward KL mixture.
template <typename F>
inline void mixture_term_and_score(int divergence, const MixtureConstants& mc, F ls, F lt, F q, F p, F& term, F& h) {
  const float beta = mc.beta, one_minus_beta = mc.one_minus_beta, log_beta = mc.log_beta, log_1m_beta = mc.log_1m_beta;
  const F x = lt - ls;
  switch (divergence) {
    case kJSD: {  // m = b p + (1 - b) q
      // Each log ratio a log-sum-exp of its own (log(p / m) as x - log(m / q) loses |x| * eps where p dominates);
      // both share log1p(exp(-|y|)), y = x + log(b / (1 - b)), and swap exactly with p and q at b = 0.5.
      const F y = x + (log_beta - log_1m_beta);
      const F shared = log1p_unit(fast_exp(y < 0.0f ? y : -y));
      const F to_q = x + log_beta, to_p = log_1m_beta - x;
      const F log_m_over_q = (to_q > log_1m_beta ? to_q : splat<F>(log_1m_beta)) + shared;
      const F log_m_over_p = (to_p > log_beta ? to_p : splat<F>(log_beta)) + shared;
      term = -beta * weighted(p, log_m_over_p) - one_minus_beta * weighted(q, log_m_over_q);
      h = -one_minus_beta * log_m_over_q;
      break;
    }
    case kSkewForwardKL: {  // KL(p || m), m = b p + (1 - b) q: p / m <= 1 / b
      const F log_m_over_p = log_add_exp(splat<F>(log_beta), log_1m_beta - x);
      term = -weighted(p, log_m_over_p);
      h = -one_minus_beta * fast_exp(-log_m_over_p);
      break;
    }
    case kTVD: {  // 0.5 * sum |p - q|; h its subgradient, -0.5 where q == p (Liger's LigerTVDLoss)
      const F diff = p - q;
      term = 0.5f * (diff < 0.0f ? -diff : diff);
      h = q > p ? splat<F>(0.5f) : splat<F>(-0.5f);
      break;
    }
    default: {  // kSkewReverseKL: KL(q || m), m = (1 - b) p + b q: q / m <= 1 / b
      const F log_m_over_q = log_add_exp(splat<F>(log_beta), x + log_1m_beta);
      term = -weighted(q, log_m_over_q);
      // -log(m / q) - b q / m shifted by +1 (centring drops it): (1 - b) p / m - log(m / q), with no O(1) part for
      // the gradient's O(1 - b) to round against near b = 1 (3% of it lost at b = 0.9999).
      h = one_minus_beta * fast_exp(x - log_m_over_q) - log_m_over_q;
      break;
    }
  }
}

struct RowStats {
  // References in logit units: e_s = exp((s - ref_s) / T), e_t = exp((t - ref_t) / T), CE's own exp(s - ref_ce).
  float ref_s, ref_t, ref_ce;
  float t_at_ref;  // the teacher's logit at the reference entry r (reverse KL's centring)
  float log_z_s, log_z_t, inv_z_s, inv_z_t, log_z_ce, inv_z_ce;
  float forward_kl;  // over these columns
  float centred;     // reverse KL's D = sum_j q_j c_j: the gradient's row sum
  float rkl_offset;  // reverse KL = D + rkl_offset (log q_r - log p_r)
  float entropy;     // the student's: at T with a divergence, at T = 1 for CE alone, else 0 (kernel_abi.h)
  int64_t ref_index;  // r: the student's argmax (fused reverse KL and mixtures), else -1
};

// A fused row's parts (kPartColumns, before any weight): the divergence, the CE against its target (log sum exp(s)
// - target = log z - (target - ref), the difference taken first: |s| may be ~1e3), the z-loss log(Z)^2 at T = 1,
// whether the label's logit is the row's largest (ref_s; a tie counts as a hit), and the student's entropy.
inline void write_fused_parts(const DistillArgs& a, int64_t row, float kd, const RowStats& st, float s_label,
                              bool in_range, float shifted_sum) {
  const float lse_ce = st.ref_ce + st.log_z_ce;
  float* parts = a.out + row * kPartColumns;
  parts[kPartKd] = kd;
  parts[kPartCe] = a.has_ce ? st.log_z_ce - ce_target_logit(a, s_label - st.ref_ce, shifted_sum) : 0.0f;
  parts[kPartZ] = a.z_loss_weight != 0.0f ? lse_ce * lse_ce : 0.0f;
  parts[kPartCorrect] = in_range && s_label >= st.ref_s ? 1.0f : 0.0f;
  parts[kPartEntropy] = st.entropy;
}

// The entropy -sum_j q_j log q_j of q_j = e_j / Z, e_j = exp(d_j), from Z and sum_j e_j d_j (`weighted`: an entry
// of -inf adds 0): log Z - (sum e d) / Z, both terms >= 0 when d_j <= 0, so nothing cancels.
inline float entropy_from_sums(float log_z, float inv_z, float weighted_sum) { return log_z - weighted_sum * inv_z; }

// An ignored row (0), or a fused row with a label or id out of range (NaN: it poisons the total).
inline void write_skipped_row(const DistillArgs& a, int64_t row, float loss) {
  if (a.phase == kPhaseFused) {
    float* parts = a.out + row * kPartColumns;
    parts[kPartKd] = loss, parts[kPartCe] = loss, parts[kPartZ] = loss, parts[kPartCorrect] = 0.0f;
    parts[kPartEntropy] = loss;
  }
  if (a.phase == kPhaseStats || a.phase == kPhaseSums) {
    for (int c = 0; c < kStatColumns; ++c) a.out[row * kStatColumns + c] = 0.0f;
  }
}

// A sparse or mapped bucket's divergence term and its score h (dL/dQ up to a constant), from its log Q and log P
// (the sparse algebra's buckets: csrc/cpu/sparse_kernel.cpp, mapped_rows.cpp); not forward KL.
template <typename F>
inline void bucket_term_and_score(int divergence, const MixtureConstants& mc, F log_q, F log_p, F q, F& term, F& h) {
  if (divergence == kReverseKL) {
    h = log_q - log_p;
    term = weighted(q, h);
    return;
  }
  mixture_term_and_score<F>(divergence, mc, log_q, log_p, q, fast_exp(log_p), term, h);
}

// How the gradient pass finds softmax(s)_j at temperature 1: from the tempered exps (T = 1: as they are,
// T = 2: squared) or from the separate exps pass 1 kept. A template parameter, so each loop is branch-free.
enum CeSource : int { kNoCe = 0, kCeFromTempered = 1, kCeFromTemperedSquared = 2, kCeFromOwnExps = 3 };

}  // namespace kdfast_cpu
