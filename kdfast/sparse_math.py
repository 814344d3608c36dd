"""A sparse teacher's divergence, once, in PyTorch (float32): what the torch backend runs and the readable statement
of what the C++, CUDA and Triton sparse kernels compute (docs/DESIGN.md, "A sparse teacher").

The teacher gives K (id, log-prob) pairs per row. Its distribution is K + 1 buckets: the K probabilities and the
rest 1 - sum(p) (tail="bucket"), or the K probabilities renormalised and no rest (tail="renormalize"). The student's
is the same buckets: its probabilities at the K ids and its mass outside them. The divergence is the sum of the
per-bucket terms, one per entry: an id listed twice in a row (peers' data has them) is two buckets of the same
column, and the gradient is the derivative of that sum. With respect to a = s / T it is, at column j,
q_j * (H_j - D): H_j the sum of the scores h = dL/dQ of the entries at j (the rest's score off the ids), D the sum
over the distinct buckets of Q * H. A score known up to a constant (centring removes it) then needs that constant
once per extra entry of a column (`SCORE_CONSTANT`). Forward KL's gradient needs no score: q_j sum(P) minus the P of
j's entries at an id, q_j (sum(P) - P_rest / Q_rest) off the ids (sum(P) is 1 but for a renormalised row with no ids).
"""

from __future__ import annotations

import math

import torch

from kdfast.divergences import mixture_term_and_score, weighted
from kdfast.kernel_abi import Divergence
from kdfast.sparse_options import STUDENT_REST_FLOOR_LOG, TEACHER_REST_FLOOR, SparseOptions

# dL/dQ minus the score `mixture_term_and_score` (or reverse KL's log Q - log P) returns: the +1 of Q log Q. The skew
# reverse KL's score carries its +1 (kdfast/divergences.py), so it is dL/dQ itself.
SCORE_CONSTANT = {Divergence.REVERSE_KL: 1.0}


def column_leaders(local_ids, held) -> torch.Tensor:
    """[R, K]: the index of the first held entry of each entry's column (itself for the first one, and for entries
    not held, which lead groups of their own)."""
    index = torch.arange(local_ids.shape[-1], device=local_ids.device).expand_as(local_ids)
    keys = torch.where(held, local_ids, -1 - index)  # distinct for the entries not held
    sorted_keys, order = keys.sort(dim=-1, stable=True)
    starts = torch.ones_like(held)
    starts[:, 1:] = sorted_keys[:, 1:] != sorted_keys[:, :-1]
    run_start = torch.where(starts, index, torch.zeros_like(index)).cummax(-1).values
    return torch.empty_like(order).scatter_(-1, order, order.gather(-1, run_start))


def group_sum(values, leader) -> torch.Tensor:
    """Each entry's sum of `values` over the entries of its column (the same float for every one of them)."""
    return torch.zeros_like(values).scatter_add(-1, leader, values).gather(-1, leader)


def teacher_buckets(ids, logprobs, opts: SparseOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """(log P at the K ids [R, K], log P of the rest [R]); -inf for padding ids and for no rest. The rest is
    1 - sum(p) as computed (below 0: rounding, none) or as given (tail="given": `logprobs` [R, K + 1]), at least
    TEACHER_REST_FLOOR where the divergence puts it under a logarithm's denominator (reverse KL): finite for any
    teacher, exact above the floor."""
    valid = ids >= 0
    minus_inf = torch.full_like(logprobs, -math.inf)
    if opts.tail == "renormalize":
        scaled = torch.where(valid, logprobs * opts.teacher_scale, minus_inf)
        total = torch.logsumexp(scaled, dim=-1, keepdim=True)
        log_p = torch.where(valid, scaled - torch.where(torch.isinf(total), torch.zeros_like(total), total), minus_inf)
        return log_p, torch.full_like(logprobs[:, 0], -math.inf)
    if opts.tail == "given":  # the rest's log-prob last (K + 1 a row)
        logprobs, given = logprobs[:, :-1], logprobs[:, -1]
        minus_inf = minus_inf[:, :-1]
    log_p = torch.where(valid, logprobs, minus_inf)
    # 1 - sum(p) in float64 (K terms a row): in float32 a rest of 1e-5 would carry a relative error of 1e-2.
    rest = given.double().exp() if opts.tail == "given" else 1.0 - log_p.double().exp().sum(-1)
    if opts.effective_divergence == Divergence.REVERSE_KL:
        rest = rest.clamp_min(TEACHER_REST_FLOOR)
    log_rest = torch.where(rest > 0, rest.clamp_min(1e-300).log(), torch.full_like(rest, -math.inf))
    return log_p, log_rest.to(logprobs.dtype)


def student_rest(log_sum_outside, covered) -> torch.Tensor:
    """log of the student's mass outside the ids, relative to the row's reference (log sum exp((s - ref) / T) over
    those columns): -inf where the ids cover every column, else at least STUDENT_REST_FLOOR_LOG, below which float32
    exps vanish (a shard's report, as the kernels' STATS phase gives it; `floored_rest` floors the row's rest)."""
    floored = log_sum_outside.clamp_min(STUDENT_REST_FLOOR_LOG)
    return torch.where(covered, torch.full_like(floored, -math.inf), floored)


def floored_rest(log_q_rest) -> torch.Tensor:
    """log Q_rest, the student's mass outside the ids as a probability, at least STUDENT_REST_FLOOR_LOG (float32's
    smallest normal): a constant there, so that forward KL against a teacher's rest stays finite where the student's
    exps underflow; -inf (the ids cover every column) stays -inf."""
    return torch.where(log_q_rest == -math.inf, log_q_rest, log_q_rest.clamp_min(STUDENT_REST_FLOOR_LOG))


def bucket_parts(log_q, log_p, counted, leader, opts: SparseOptions, centre: bool):
    """(the buckets' part of the divergence [R], per-entry column scores H [R, K + 1] or None, D [R]).

    log_q, log_p: [R, K + 1] log-probabilities of the K entries and of the rest (last); counted: [R, K + 1] the buckets
    this call adds up (a vocab shard: the ids it holds, and the rest on one shard); leader: [R, K] column_leaders'.
    A teacher's rest meets no student bucket where the ids cover the row (log Q_rest = -inf): it is rounding of
    log-probs that cover the vocabulary, and adds nothing. `centre`: a whole row, centred on the student's largest
    bucket (docs/DESIGN.md, "The gradient"); a shard's D is uncentred."""
    log_p = torch.cat([log_p[:, :-1], torch.where(log_q[:, -1] == -math.inf, -math.inf, log_p[:, -1])[:, None]], -1)
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
    # A column's score: its first entry's plus, for each further entry, that entry's and the constant (so a column of
    # one entry keeps its score bit for bit).
    leads = leader == torch.arange(leader.shape[-1], device=leader.device)
    extra = torch.where(leads, 0.0, SCORE_CONSTANT.get(divergence, 0.0))
    column_scores = torch.cat([group_sum(scores[:, :-1] + extra, leader), scores[:, -1:]], dim=-1)
    if centre:
        reference = q.argmax(-1, keepdim=True)
        column_scores = (column_scores - column_scores.gather(-1, reference)).scatter(-1, reference, 0.0)
    first = torch.cat([leads, torch.ones_like(counted[:, -1:])], dim=-1)
    return (torch.where(counted, terms, zeros).sum(-1), column_scores,
            torch.where(counted & first, weighted(q, column_scores), zeros).sum(-1))


def bucket_gradient(log_q, log_p, column_scores, row_sum, leader, opts: SparseOptions):
    """d(divergence)/d(s / T) by bucket: (at the K entries' columns [R, K], the same for every entry of a column;
    rest_factor [R]: q_j * rest_factor at a column j outside the ids), from bucket_parts' scores and the row's D (the
    global one on a shard)."""
    q, p = log_q.exp(), log_p.exp()
    if opts.effective_divergence == Divergence.FORWARD_KL:
        # d/da_j = q_j sum(P) - q_j sum_b(P_b / Q_b at j): sum(P) is 1, but for a renormalised row with no ids (0).
        p_rest = torch.where(log_q[:, -1] == -math.inf, 0.0, p[:, -1])  # a rest with no student bucket: none
        # A floored rest is a constant: its term -P_r log Q_r moves no logit (neither through Q_r nor through the
        # normaliser), so P_r leaves sum(P) and the rest's columns get no target.
        floored = log_q[:, -1] <= STUDENT_REST_FLOOR_LOG
        total = p[:, :-1].sum(-1) + torch.where(floored, 0.0, p_rest)
        rest_q = q[:, -1]
        safe = torch.where(rest_q > 0, rest_q, torch.ones_like(rest_q))
        rest_factor = total - torch.where((rest_q > 0) & ~floored, p_rest / safe, torch.zeros_like(rest_q))
        return q[:, :-1] * total[:, None] - group_sum(p[:, :-1], leader), rest_factor
    # No column outside the ids (Q_rest = 0): nothing takes the rest's factor, whose score is then undefined.
    rest_factor = torch.where(q[:, -1] > 0, column_scores[:, -1] - row_sum, torch.zeros_like(row_sum))
    return weighted(q[:, :-1], column_scores[:, :-1] - row_sum[:, None]), rest_factor
