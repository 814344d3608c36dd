"""Per-element terms of kdfast's divergences for the Triton kernels (kernels/distill.py, kernels/sparse.py,
kernels/mixture.py), in one place so that each kernel's loss and each mixed teacher's own divergence are the same
arithmetic."""

from __future__ import annotations

import triton
import triton.language as tl

from kdfast.kernel_abi import Divergence

JSD = tl.constexpr(int(Divergence.JSD))
SKEW_FORWARD_KL = tl.constexpr(int(Divergence.SKEW_FORWARD_KL))
TVD = tl.constexpr(int(Divergence.TVD))


@triton.jit
def weighted(prob, log_ratio):
    # 0 * anything = 0: a zero probability adds nothing, even against log 0 = -inf.
    return tl.where(prob == 0.0, 0.0, prob * log_ratio)


@triton.jit
def log1p_unit(e):
    """log(1 + e) for e in [0, 1] within 3 ulp of the result however small e is (csrc/cpu/simd_math.h's
    log1p_unit): 2 atanh(f), f = e / (2 + e) <= 1/3, by its series to f^15. tl.log(1.0 + e) drops every bit of e
    below 2^-24 (a GPU's approximate log errs by 2^-22 absolute besides), and JSD near beta = 0 or 1 is a sum of such
    terms: 1% of its gradient off at beta = 1e-6. libdevice's log1p does not run under the interpreter."""
    f = e / (2.0 + e)
    f2 = f * f
    series = 1.0 / 15.0
    series = series * f2 + 1.0 / 13.0
    series = series * f2 + 1.0 / 11.0
    series = series * f2 + 1.0 / 9.0
    series = series * f2 + 1.0 / 7.0
    series = series * f2 + 1.0 / 5.0
    series = series * f2 + 1.0 / 3.0
    return (f + f) * (1.0 + f2 * series)


@triton.jit
def log_add_exp(a, b):
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    result = tl.where(hi == float("-inf"), hi, hi + log1p_unit(tl.exp(lo - hi)))
    # On a GPU maximum / minimum drop a NaN operand (the interpreter keeps it); the row's loss must see it.
    return tl.where((a != a) | (b != b), a + b, result)


@triton.jit
def mixture_term_and_score(ls, lt, q, p, beta, log_beta, log_1m_beta, DIVERGENCE: tl.constexpr):
    """Per-element divergence terms and scores h = dL/dq (up to a constant) of JSD and the skews (beta > 0), from
    x = log p - log q: log(m / q) and log(m / p) are log-sum-exps of x and a constant, exact in both limits of a
    near-one-hot row (no difference of two large log-probabilities)."""
    x = lt - ls
    # Above 1/2, 1 - beta from its log (the host's log1p, in double): from a float32 beta near 1, 1.0 - beta is up to
    # 2^-25 off (19% at beta = 1 - 1e-7). At or below it 1.0 - beta is exact to an ulp, and at 1/2 equals beta (JSD's
    # symmetry in p and q).
    one_minus_beta = tl.where(beta > 0.5, tl.exp(log_1m_beta), 1.0 - beta)
    if DIVERGENCE == JSD:  # m = b p + (1 - b) q
        # Each log ratio a log-sum-exp of its own (log(p / m) as x - log(m / q) loses |x| * eps where p dominates);
        # both share log1p(exp(-|y|)), y = x + log(b / (1 - b)), and swap exactly with p and q at b = 0.5. A NaN
        # reaches both through the shared term (maximum drops it on a GPU).
        shared = log1p_unit(tl.exp(-tl.abs(x + (log_beta - log_1m_beta))))
        log_m_over_q = tl.maximum(x + log_beta, log_1m_beta) + shared
        log_m_over_p = tl.maximum(log_1m_beta - x, log_beta) + shared
        terms = -beta * weighted(p, log_m_over_p) - one_minus_beta * weighted(q, log_m_over_q)
        h = -one_minus_beta * log_m_over_q
    elif DIVERGENCE == SKEW_FORWARD_KL:  # KL(p || m), m = b p + (1 - b) q: p / m <= 1 / b
        log_m_over_p = log_add_exp(log_beta + tl.zeros_like(x), log_1m_beta - x)
        terms = -weighted(p, log_m_over_p)
        h = -one_minus_beta * tl.exp(-log_m_over_p)
    elif DIVERGENCE == TVD:  # 0.5 * sum |p - q|; h its subgradient, -0.5 where q == p (Liger's LigerTVDLoss)
        terms = 0.5 * tl.abs(p - q)
        h = tl.where(q > p, 0.5, -0.5) + tl.zeros_like(x)
    else:  # skew reverse KL: KL(q || m), m = (1 - b) p + b q: q / m <= 1 / b
        log_m_over_q = log_add_exp(log_beta + tl.zeros_like(x), x + log_1m_beta)
        terms = -weighted(q, log_m_over_q)
        # -log(m / q) - b q / m shifted by +1 (centring drops it): (1 - b) p / m - log(m / q), with no O(1) part for
        # the gradient's O(1 - b) to round against near b = 1 (3% of it lost at b = 0.9999).
        h = one_minus_beta * tl.exp(x - log_m_over_q) - log_m_over_q
    return terms, h
