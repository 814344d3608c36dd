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

struct Scratch {
  std::vector<float> student, teacher, exp_student, exp_teacher, exp_ce;
  void reserve(int64_t vocab) {
    for (auto* buffer : {&student, &teacher, &exp_student, &exp_teacher, &exp_ce}) {
      if (static_cast<int64_t>(buffer->size()) < vocab) buffer->resize(vocab);
    }
  }
};

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

// 0 * (anything) = 0: a zero probability adds nothing even against a log of -inf.
template <typename F>
inline F weighted(F prob, F log_ratio) {
  return prob == 0.0f ? splat<F>(0.0f) : prob * log_ratio;
}

// A mixture's loss term at one element and its score h = dL/dq (up to a constant, which centring removes), from
// x = log p - log q: log(m / q) and log(m / p) are log-sum-exps of x and a constant, exact in both limits of a
// near-one-hot row (no difference of two large log-probabilities). beta > 0 here (beta = 0 is a plain KL).
template <typename F>
inline void mixture_term_and_score(int divergence, float beta, float log_beta, float log_1m_beta, F ls, F lt, F q,
                                   F p, F& term, F& h) {
  const F x = lt - ls;
  switch (divergence) {
    case kJSD: {  // m = b p + (1 - b) q
      const F log_m_over_q = log_add_exp(x + log_beta, splat<F>(log_1m_beta));
      const F log_p_over_m = x == INFINITY ? splat<F>(-log_beta) : x - log_m_over_q;
      term = beta * weighted(p, log_p_over_m) - (1.0f - beta) * weighted(q, log_m_over_q);
      h = -(1.0f - beta) * log_m_over_q;
      break;
    }
    case kSkewForwardKL: {  // KL(p || m), m = b p + (1 - b) q: p / m <= 1 / b
      const F log_m_over_p = log_add_exp(splat<F>(log_beta), log_1m_beta - x);
      term = -weighted(p, log_m_over_p);
      h = -(1.0f - beta) * fast_exp(-log_m_over_p);
      break;
    }
    default: {  // kSkewReverseKL: KL(q || m), m = (1 - b) p + b q: q / m <= 1 / b
      const F log_m_over_q = log_add_exp(splat<F>(log_beta), x + log_1m_beta);
      term = -weighted(q, log_m_over_q);
      h = -log_m_over_q - beta * fast_exp(-log_m_over_q);
      break;
    }
  }
}

struct MixtureConstants {
  float beta, log_beta, log_1m_beta;
  explicit MixtureConstants(float b)
      : beta(b), log_beta(b > 0.0f ? std::log(b) : -INFINITY), log_1m_beta(b < 1.0f ? std::log1p(-b) : -INFINITY) {}
};

// How the gradient pass finds softmax(s)_j at temperature 1: from the tempered exps (T = 1: as they are,
// T = 2: squared) or from the separate exps pass 1 kept. A template parameter, so each loop is branch-free.
enum CeSource : int { kNoCe = 0, kCeFromTempered = 1, kCeFromTemperedSquared = 2, kCeFromOwnExps = 3 };

}  // namespace kdfast_cpu
