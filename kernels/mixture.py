"""Several teachers mixed inside the Triton row kernel (docs/DESIGN.md, "A mixture is not a new loss"):
p_bar = sum_m w_m softmax(t_m / T), handed to kernels/distill.py's passes as the logits T * log p_bar, whose softmax
at T is p_bar, so that every divergence, the CE family and the numerical guards are the single teacher's.

Triton takes no list of pointers: the teachers share one dtype and one layout, and teacher m's row is teacher 0's
plus m's element offset (`offsets_ptr`, int64). Per row a pre-pass writes each teacher's (ref_m, log w_m - log z_m)
into a float32 scratch row [M, 2]; every later read of the teacher recomputes the mixture from the M rows (no
[rows, V] mixture is written)."""

from __future__ import annotations

import triton
import triton.language as tl

from kdfast.kernel_abi import Divergence
from kdfast.kernels.divergence_terms import mixture_term_and_score, weighted

FORWARD_KL = tl.constexpr(int(Divergence.FORWARD_KL))
REVERSE_KL = tl.constexpr(int(Divergence.REVERSE_KL))


@triton.jit
def _finite_or_zero(reference):
    # A max of +-inf (no mass, an inf logit) must not be subtracted: inf - inf is NaN.
    return tl.where((reference == float("-inf")) | (reference == float("inf")), 0.0, reference)


@triton.jit
def mixture_prepass(t_row, offsets_ptr, log_weights_row, scratch_row, teachers, vocab, inv_t, own_row,
                    BLOCK_V: tl.constexpr, OWN_KL: tl.constexpr):
    """scratch_row[2m], [2m + 1] = ref_m (teacher m's max over the row, 0 if not finite) and log w_m - log z_m,
    z_m = sum_j exp((t_mj - ref_m) / T); -inf for a teacher that adds nothing to this row (its weight is 0, or its
    row is all -inf, as the C++ kernel drops it), which the mixed reads then never load. OWN_KL (each teacher's own
    divergence wanted, `own_divergence`): every teacher's max and z are taken, a routed-away one's too, and
    own_row[m] = log z_m (NaN without a finite max)."""
    offsets = tl.arange(0, BLOCK_V)
    for m in range(teachers):
        log_weight = tl.load(log_weights_row + m)
        top = tl.full([], float("-inf"), tl.float32)
        z = tl.full([], 0.0, tl.float32)
        if (log_weight != float("-inf")) or OWN_KL:  # a routed-away teacher's row is read for OWN_KL alone
            row = t_row + tl.load(offsets_ptr + m)
            for start in range(0, vocab, BLOCK_V):
                cols = start + offsets
                t = tl.load(row + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
                top_new = tl.maximum(top, tl.max(t, axis=0))
                alpha = tl.where(top_new != top, tl.exp((top - top_new) * inv_t), 1.0)
                z = z * alpha + tl.sum(tl.exp((t - _finite_or_zero(top_new)) * inv_t), axis=0)
                top = top_new
        tl.store(scratch_row + 2 * m, _finite_or_zero(top))
        tl.store(scratch_row + 2 * m + 1, tl.where(z > 0.0, log_weight - tl.log(z), float("-inf")))
        if OWN_KL:
            finite = (top != float("-inf")) & (top != float("inf"))
            tl.store(own_row + m, tl.where(finite, tl.log(z), float("nan")))
    # On a GPU one thread stores a scalar and every thread of the program reads it back in the later passes.
    tl.debug_barrier()


@triton.jit
def _mixture_term(t_row, offsets_ptr, scratch_row, m, cols, mask, inv_t):
    """(t_m - ref_m) / T + log w_m - log z_m at `cols`; -inf for a dropped teacher, whose row is not loaded."""
    log_scale = tl.load(scratch_row + 2 * m + 1)
    row = t_row + tl.load(offsets_ptr + m)
    # (tl.where: the interpreter cannot `&` a block mask with a splatted scalar condition)
    keep = tl.where(log_scale != float("-inf"), mask, False)
    t = tl.load(row + cols, mask=keep, other=float("-inf")).to(tl.float32)
    # Centred before the temperature divides: t / T - ref / T would round every term by |ref| / T.
    return (t - tl.load(scratch_row + 2 * m)) * inv_t + log_scale


@triton.jit
def mixed_teacher(t_row, offsets_ptr, scratch_row, teachers, cols, mask, inv_t, ONCE: tl.constexpr):
    """The mixture's logits at `cols` (a block, or one column), float32: T * log p_bar, with log p_bar the exact
    log-sum-exp over m of the terms (never the log of an underflowed sum): -inf where no teacher has mass, and masked
    lanes -inf as a single teacher's load gives them. Either their max, then a sum of exps (each teacher's block read
    twice), or with ONCE a running log-sum-exp over m (each read once; one exp a term as well: exp(-|term - max|))."""
    if ONCE:
        return _mixed_teacher_once(t_row, offsets_ptr, scratch_row, teachers, cols, mask, inv_t)
    hi = tl.zeros_like(cols).to(tl.float32) + float("-inf")
    for m in range(teachers):
        hi = tl.maximum(hi, _mixture_term(t_row, offsets_ptr, scratch_row, m, cols, mask, inv_t))
    base = _finite_or_zero(hi)
    total = tl.zeros_like(hi)
    for m in range(teachers):  # each block read again, not held: M is a run-time count
        total += tl.exp(_mixture_term(t_row, offsets_ptr, scratch_row, m, cols, mask, inv_t) - base)
    # A NaN term poisons the sum even where maximum dropped it (on a GPU).
    return (base + tl.log(total)) * (1.0 / inv_t)


@triton.jit
def _mixed_teacher_once(t_row, offsets_ptr, scratch_row, teachers, cols, mask, inv_t):
    """mixed_teacher's value from one read of each teacher's block: `total` is the sum of exp(term - hi) under the
    running max `hi`, rescaled when a term passes it. A term of -inf adds nothing (its exp would be exp(NaN) while
    hi is -inf too); a NaN term makes the sum NaN, as the two-read form's does; a +inf term (an inf logit) is +inf."""
    hi = tl.zeros_like(cols).to(tl.float32) + float("-inf")
    total = tl.zeros_like(hi)
    for m in range(teachers):
        term = _mixture_term(t_row, offsets_ptr, scratch_row, m, cols, mask, inv_t)
        bigger = term > hi
        e = tl.exp(tl.where(bigger, hi - term, term - hi))
        e = tl.where(term == float("-inf"), 0.0, e)
        total = tl.where(bigger, total * e + 1.0, total + e)
        hi = tl.maximum(hi, term)
    mixed = tl.where(hi == float("inf"), hi, _finite_or_zero(hi) + tl.log(total))
    return mixed * (1.0 / inv_t)


@triton.jit
def own_divergence(t_row, offsets_ptr, scratch_row, own_row, teachers, cols, mask, inv_t, log_q, own_acc, beta,
                   log_beta, log_1m_beta, OWN_BLOCK: tl.constexpr, DIVERGENCE: tl.constexpr):
    """own_acc [OWN_BLOCK] plus this block's terms of each teacher m's own divergence against the student (log q):
    forward KL's sum_j p_mj (log p_mj - log q_j), reverse KL's sum_j q_j (log q_j - log p_mj), or the other
    divergences' terms as the loss pass takes them (divergence_terms.py); the row's value once every block has added
    in (log p_m from the pre-pass's max and own_row's log z_m)."""
    index = tl.arange(0, OWN_BLOCK)
    q = tl.exp(log_q)
    for m in range(teachers):
        t = tl.load(t_row + tl.load(offsets_ptr + m) + cols, mask=mask, other=float("-inf")).to(tl.float32)
        log_p = (t - tl.load(scratch_row + 2 * m)) * inv_t - tl.load(own_row + m)
        if DIVERGENCE == FORWARD_KL:
            terms = weighted(tl.exp(log_p), log_p - log_q)
        elif DIVERGENCE == REVERSE_KL:
            terms = weighted(q, log_q - log_p)
        else:
            terms, unused_h = mixture_term_and_score(log_q, log_p, q, tl.exp(log_p), beta, log_beta, log_1m_beta,
                                                     DIVERGENCE)
        own_acc = tl.where(index == m, own_acc + tl.sum(tl.where(mask, terms, 0.0), axis=0), own_acc)
    return own_acc
