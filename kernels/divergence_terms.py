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
def log_add_exp(a, b):
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    # log(1 + x) with tl.log: libdevice's log1p is not available under the interpreter.
    result = tl.where(hi == float("-inf"), hi, hi + tl.log(1.0 + tl.exp(lo - hi)))
    # On a GPU maximum / minimum drop a NaN operand (the interpreter keeps it); the row's loss must see it.
    return tl.where((a != a) | (b != b), a + b, result)


@triton.jit
def mixture_term_and_score(ls, lt, q, p, beta, log_beta, log_1m_beta, DIVERGENCE: tl.constexpr):
    """Per-element divergence terms and scores h = dL/dq (up to a constant) of JSD and the skews (beta > 0), from
    x = log p - log q: log(m / q) and log(m / p) are log-sum-exps of x and a constant, exact in both limits of a
    near-one-hot row (no difference of two large log-probabilities)."""
    x = lt - ls
    if DIVERGENCE == JSD:  # m = b p + (1 - b) q
        # Each log ratio a log-sum-exp of its own (log(p / m) as x - log(m / q) loses |x| * eps where p dominates);
        # both share log1p(exp(-|y|)), y = x + log(b / (1 - b)), and swap exactly with p and q at b = 0.5. A NaN
        # reaches both through the shared term (maximum drops it on a GPU).
        shared = tl.log(1.0 + tl.exp(-tl.abs(x + (log_beta - log_1m_beta))))
        log_m_over_q = tl.maximum(x + log_beta, log_1m_beta) + shared
        log_m_over_p = tl.maximum(log_1m_beta - x, log_beta) + shared
        terms = -beta * weighted(p, log_m_over_p) - (1.0 - beta) * weighted(q, log_m_over_q)
        h = -(1.0 - beta) * log_m_over_q
    elif DIVERGENCE == SKEW_FORWARD_KL:  # KL(p || m), m = b p + (1 - b) q: p / m <= 1 / b
        log_m_over_p = log_add_exp(log_beta + tl.zeros_like(x), log_1m_beta - x)
        terms = -weighted(p, log_m_over_p)
        h = -(1.0 - beta) * tl.exp(-log_m_over_p)
    elif DIVERGENCE == TVD:  # 0.5 * sum |p - q|; h its subgradient, -0.5 where q == p (Liger's LigerTVDLoss)
        terms = 0.5 * tl.abs(p - q)
        h = tl.where(q > p, 0.5, -0.5) + tl.zeros_like(x)
    else:  # skew reverse KL: KL(q || m), m = (1 - b) p + b q: q / m <= 1 / b
        log_m_over_q = log_add_exp(log_beta + tl.zeros_like(x), x + log_1m_beta)
        terms = -weighted(q, log_m_over_q)
        h = -log_m_over_q - beta * tl.exp(-log_m_over_q)
    return terms, h
