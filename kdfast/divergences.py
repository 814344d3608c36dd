"""The divergences' math, once, in PyTorch (float32): the torch backend runs it, and it is the readable statement of
what the C++, CUDA and Triton kernels compute (docs/DESIGN.md, "The gradient"). The float64 oracle the tests hold
everything to is kdfast.reference, written apart and naively on purpose.

Per row, with log-probabilities ls (student) and lt (teacher) at T, q = exp(ls), p = exp(lt):
- a row's divergence is the sum of its per-element terms;
- its gradient with respect to a = s / T is q * (h - sum(q * h)) with h = dL/dq; forward KL's is simply q - p.
  Near a dominant entry (q_r ~ 1) that difference cancels; centred on r it does not: with d = h - h_r (d_r = 0)
  and D = sum(q * d), the gradient is q * (d - D). Reverse KL's d is formed from logit differences,
  ((s - s_r) - (t - t_r)) / T, so that no log-probability of the loss's size is subtracted. A vocab shard does
  not know r: it uses h itself (the global row sums then come from all shards).
"""

from __future__ import annotations

import math

import torch

from kdfast.kernel_abi import Divergence
from kdfast.options import LossOptions


def weighted(prob: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """prob * log_ratio with 0 * anything = 0 (teacher logits of -inf add nothing, and no NaN from 0 * inf)."""
    return torch.where(prob == 0, torch.zeros_like(prob), prob * log_ratio)


def finite_or_zero(reference: torch.Tensor) -> torch.Tensor:
    """A row max of -inf (a row of -inf logits) serves as 0, so that x - max is -inf rather than NaN."""
    return torch.where(torch.isinf(reference), torch.zeros_like(reference), reference)


def log_normaliser(x: torch.Tensor, inv_t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(max in logit units, log sum exp((x - max) / T)), each [rows, 1]: log-probabilities are then
    (x - max) / T - log z, with no rounding of the size of |max| / T."""
    reference = finite_or_zero(x.max(-1, keepdim=True).values)
    return reference, torch.logsumexp((x - reference) * inv_t, dim=-1, keepdim=True)


def _log_add_exp(constant: float, x: torch.Tensor) -> torch.Tensor:
    """log(exp(constant) + exp(x)) in float32. The constant is made on x's device: logaddexp takes no CPU scalar
    beside CUDA tensors (the skew divergences of the torch backend failed on a GPU, seen on an H200 on 2026-12-04)."""
    x = x.float()
    return torch.logaddexp(x.new_tensor(constant), x)


def jsd_log_ratios(x, log_beta: float, log_1m_beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log(m / q), log(m / p)) for m = b p + (1 - b) q, each a log-sum-exp of its own (log(p / m) taken as
    x - log(m / q) loses |x| * eps where p dominates). Both share log1p(exp(-|y|)), y = x + log(b / (1 - b)): one
    exp and one log an element, and at b = 0.5 swapping p and q swaps the two exactly (TRL's symmetry)."""
    shared = torch.log1p(torch.exp(-(x + (log_beta - log_1m_beta)).abs()))
    return (x + log_beta).clamp_min(log_1m_beta) + shared, (log_1m_beta - x).clamp_min(log_beta) + shared


def mixture_term_and_score(ls, lt, opts: LossOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """A mixture's per-element loss terms and scores h = dL/dq (up to a constant, which centring removes), from
    x = log p - log q: log(m / q) and log(m / p) are log-sum-exps of x and a constant, so a near-one-hot row gives
    them exactly (no difference of two large log-probabilities). Beta is in (0, 1] here: beta = 0 is a plain
    KL (LossOptions.effective_divergence)."""
    beta, divergence = opts.beta, opts.effective_divergence
    if divergence == Divergence.TVD:  # 0.5 * sum |p - q|; h its subgradient, -0.5 where q == p (Liger's)
        q, p = ls.exp(), lt.exp()
        return 0.5 * (p - q).abs(), torch.where(q > p, 0.5, -0.5)
    log_beta, log_1m_beta = math.log(beta), (math.log1p(-beta) if beta < 1 else -math.inf)
    q, p = ls.exp(), lt.exp()
    x = lt - ls
    if divergence == Divergence.JSD:  # m = b p + (1 - b) q
        log_m_over_q, log_m_over_p = jsd_log_ratios(x, log_beta, log_1m_beta)
        term = -beta * weighted(p, log_m_over_p) - (1 - beta) * weighted(q, log_m_over_q)
        return term, -(1 - beta) * log_m_over_q
    if divergence == Divergence.SKEW_FORWARD_KL:  # KL(p || m), m = b p + (1 - b) q: p / m <= 1 / b
        log_m_over_p = _log_add_exp(log_beta, log_1m_beta - x)
        return -weighted(p, log_m_over_p), -(1 - beta) * (-log_m_over_p).exp()
    log_m_over_q = _log_add_exp(log_beta, x + log_1m_beta)  # skew reverse KL: KL(q || m), m = (1 - b) p + b q
    # The score -log(m / q) - b q / m shifted by +1 (centring drops it): (1 - b) p / m - log(m / q), with no O(1)
    # part for the gradient's O(1 - b) to round against near b = 1 (3% of it lost at b = 0.9999).
    return -weighted(q, log_m_over_q), (1 - beta) * (x - log_m_over_q).exp() - log_m_over_q


def kd_parts(s, t, ls, lt, opts: LossOptions, centre: bool):
    """(divergence per row [R], scores d [R, V] or None, D = sum(q * d) [R]) for raw logits s, t and their
    log-probabilities at T. `centre`: a whole row, centred on the student's argmax; else a shard, uncentred."""
    divergence = opts.effective_divergence
    q = ls.exp()
    if divergence == Divergence.FORWARD_KL:
        return weighted(lt.exp(), lt - ls).sum(-1), None, torch.zeros_like(ls[:, 0])
    reference = s.argmax(-1, keepdim=True) if centre else None
    if divergence == Divergence.REVERSE_KL:
        if reference is None:
            scores = ls - lt
            row_sum = weighted(q, scores).sum(-1)
            return row_sum, scores, row_sum
        # With no teacher mass at r (t_r = -inf, an infinite divergence) the teacher's argmax anchors t instead.
        anchor = torch.where(torch.isfinite(t.gather(-1, reference)), reference, t.argmax(-1, keepdim=True))
        scores = ((s - s.gather(-1, reference)) - (t - t.gather(-1, anchor))) / opts.temperature
        row_sum = weighted(q, scores).sum(-1)
        # log q - log p - scores is one constant per row; read where it is finite.
        offset = (ls - lt - scores).gather(-1, anchor).squeeze(-1)
        return row_sum + offset, scores, row_sum
    terms, scores = mixture_term_and_score(ls, lt, opts)
    if reference is not None:
        scores = (scores - scores.gather(-1, reference)).scatter(-1, reference, 0.0)
    return terms.sum(-1), scores, weighted(q, scores).sum(-1)


def kd_gradient(ls, lt, scores, row_sum, opts: LossOptions) -> torch.Tensor:
    """d(divergence)/d(s / T) [R, V] from kd_parts' scores and the row's D (the global one on a shard)."""
    if opts.effective_divergence == Divergence.FORWARD_KL:
        return ls.exp() - lt.exp()
    return weighted(ls.exp(), scores - row_sum[:, None])


def ce_target_logit(opts: LossOptions, label_logit, shifted_sum, vocab: int):
    """The CE target's logit (relative to the same reference as its arguments): the label's, or with label smoothing
    eps (1 - eps) * label_logit + eps / V * sum_j s_j over the whole vocabulary of V columns (`shifted_sum`: this
    call's columns; a shard's partial sums add up over the ranks)."""
    eps = opts.label_smoothing
    return label_logit if eps == 0.0 else (1.0 - eps) * label_logit + (eps / vocab) * shifted_sum


def ce_coefficients(opts: LossOptions, row_scale, lse, vocab: int):
    """(soft [R], label, uniform): the CE family's gradient is soft * softmax(s) - label * onehot - uniform per row:
    the CE's (1 - eps) on the label and eps / V on every column, and the z-loss's 2 * weight * lse on the softmax."""
    ce = row_scale * opts.ce_weight
    z = 2.0 * opts.z_loss_weight * lse if opts.z_loss_weight else torch.zeros_like(lse)  # no 0 * inf on -inf rows
    soft = row_scale * (opts.ce_weight + z)
    return soft, ce * (1.0 - opts.label_smoothing), ce * (opts.label_smoothing / vocab)


def q_log_q(log_q: torch.Tensor) -> torch.Tensor:
    """sum_j q_j log q_j over the columns given [R], with 0 * log 0 = 0 (a logit of -inf adds nothing, never NaN):
    minus the student's entropy over a whole row, a shard's share of it over its columns. With log q = d - log Z
    (d = (s - ref) / T) it is sum_j q_j d_j - log Z: the kernels' H = log Z - sum_j e_j d_j / Z, e = exp(d)."""
    return weighted(log_q.exp(), log_q).sum(-1)


def fused_parts(kd, label_logit, held, row_max, log_z_c, opts: LossOptions, zeros, shifted_sum,
                vocab: int, entropy=None) -> torch.Tensor:
    """A FUSED chunk's parts [R, PART_COLUMNS]: the divergence, the CE, the z-loss log(Z)^2 (student, T = 1),
    whether the label's logit is the row's largest (ties count) and the student's entropy (`entropy`, None: 0). A
    label out of range (refused on the host where that costs no sync) poisons its row with NaN, never hides.
    `shifted_sum`: sum_j (s_j - row_max) for label smoothing."""
    kd = kd if kd is not None else zeros
    entropy = entropy if entropy is not None else zeros
    z = (row_max + log_z_c) ** 2 if opts.z_loss_weight != 0.0 else zeros
    if label_logit is None:
        return torch.stack([kd, zeros, z, zeros, entropy], dim=-1)
    correct = (held & (label_logit >= row_max)).float()
    ce = zeros
    if opts.has_ce:
        # log sum exp(s) - target = log z - (target - max), the difference taken first.
        ce = log_z_c - ce_target_logit(opts, label_logit - row_max, shifted_sum, vocab)
    if opts.needs_labels:
        poisoned = torch.full_like(zeros, math.nan)
        kd, ce, z, entropy = (torch.where(held, part, poisoned) for part in (kd, ce, z, entropy))
    return torch.stack([kd, ce, z, correct, entropy], dim=-1)
