"""A sparse teacher's divergence, once, in PyTorch (float32): what the torch backend runs and the readable statement
of what the C++, CUDA and Triton sparse kernels compute (docs/DESIGN.md, "A sparse teacher").

The teacher gives K (id, log-prob) pairs per row. Its distribution is K + 1 buckets: the K probabilities and the
rest 1 - sum(p) (tail="bucket"), or the K probabilities renormalised and no rest (tail="renormalize"). The student's
is the same buckets: its probabilities at the K ids and its mass outside them. The divergence is the dense one over
the buckets, so its gradient with respect to a = s / T has the dense form with one score per bucket: column j of
bucket b gets q_j * (h_b - sum_b Q_b h_b) (forward KL: Q_k - P_k at an id, q_j (1 - P_rest / Q_rest) elsewhere,
with 1 = sum(P)).
"""

from __future__ import annotations

import math

import torch

from kdfast.divergences import mixture_term_and_score, weighted
from kdfast.kernel_abi import Divergence
from kdfast.sparse_options import REST_AS_NONE, SparseOptions


def teacher_buckets(ids, logprobs, opts: SparseOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """(log P at the K ids [R, K], log P of the rest [R]); -inf for padding ids and for no rest."""
    valid = ids >= 0
    minus_inf = torch.full_like(logprobs, -math.inf)
    if opts.tail == "renormalize":
        scaled = torch.where(valid, logprobs * opts.teacher_scale, minus_inf)
        total = torch.logsumexp(scaled, dim=-1, keepdim=True)
        log_p = torch.where(valid, scaled - torch.where(torch.isinf(total), torch.zeros_like(total), total), minus_inf)
        return log_p, torch.full_like(logprobs[:, 0], -math.inf)
    log_p = torch.where(valid, logprobs, minus_inf)
    # 1 - sum(p) in float64 (K terms a row): in float32 a rest of 1e-5 would carry a relative error of 1e-2.
    rest = 1.0 - log_p.double().exp().sum(-1)
    log_rest = torch.where(rest <= REST_AS_NONE, torch.full_like(rest, -math.inf), rest.clamp_min(1e-300).log())
    return log_p, log_rest.to(logprobs.dtype)


def bucket_parts(log_q, log_p, counted, opts: SparseOptions, centre: bool):
    """(the buckets' part of the divergence [R], scores d [R, K + 1] or None, D = sum(Q d) [R]).

    log_q, log_p: [R, K + 1] log-probabilities of the K ids and of the rest (last); counted: [R, K + 1] the buckets this
    call adds up (a vocab shard: the ids it holds, and the rest on one shard). `centre`: a whole row, centred on the
    student's largest bucket (docs/DESIGN.md, "The gradient"); a shard's D is uncentred."""
    q, p = log_q.exp(), log_p.exp()
    zeros = torch.zeros_like(log_q)
    divergence = opts.effective_divergence
    if divergence == Divergence.FORWARD_KL:
        kd = torch.where(counted, weighted(p, log_p - log_q), zeros).sum(-1)
        return kd, None, torch.zeros_like(kd)
    if divergence == Divergence.REVERSE_KL:
        terms, scores = weighted(q, log_q - log_p), log_q - log_p
    else:
        terms, scores = mixture_term_and_score(log_q, log_p, opts)
    if centre:
        reference = q.argmax(-1, keepdim=True)
        scores = (scores - scores.gather(-1, reference)).scatter(-1, reference, 0.0)
    return (torch.where(counted, terms, zeros).sum(-1), scores,
            torch.where(counted, weighted(q, scores), zeros).sum(-1))


def bucket_gradient(log_q, log_p, scores, row_sum, opts: SparseOptions):
    """d(divergence)/d(s / T) by bucket: (at the K ids' columns [R, K], rest_factor [R]: q_j * rest_factor at a
    column j outside the ids), from bucket_parts' scores and the row's D (the global one on a shard)."""
    q, p = log_q.exp(), log_p.exp()
    if opts.effective_divergence == Divergence.FORWARD_KL:
        # d/da_j = q_j sum(P) - P_b q_j / Q_b: sum(P) is 1, but for a renormalised row with no ids (then 0)
        total = p.sum(-1)
        rest_q, rest_p = q[:, -1], p[:, -1]
        safe = torch.where(rest_q > 0, rest_q, torch.ones_like(rest_q))
        rest_factor = total - torch.where(rest_q > 0, rest_p / safe, torch.zeros_like(rest_q))
        return q[:, :-1] * total[:, None] - p[:, :-1], rest_factor
    # No column outside the ids (Q_rest = 0): nothing takes the rest's factor, whose score is then undefined.
    rest_factor = torch.where(q[:, -1] > 0, scores[:, -1] - row_sum, torch.zeros_like(row_sum))
    return weighted(q[:, :-1], scores[:, :-1] - row_sum[:, None]), rest_factor
