"""A sparse teacher's loss in plain PyTorch (kdfast.sparse_math), every phase, chunked over rows: the torch backend's
`sparse_forward_rows`. STATS' middle column is the student's log-sum-exp over the columns outside the teacher's ids
(where a dense teacher has its own); the rest bucket is added by the shard at col_offset 0."""

from __future__ import annotations

import math

import torch

from kdfast import divergences, sparse_math
from kdfast.backends import torch_rows
from kdfast.kernel_abi import FUSED, PART_COLUMNS, STAT_COLUMNS, Phase, PhaseCall, SparseTargets
from kdfast.sparse_options import SparseOptions

_CHUNK_ELEMENTS = 1 << 24


def _widened(logprobs: torch.Tensor) -> torch.Tensor:
    """Log-probs in float32, or float64 where they came so (kept: see the teacher's rest in `_chunk_rows`)."""
    return logprobs if logprobs.dtype == torch.float64 else logprobs.float()


def _chunk_rows(s, ids, logprobs, labels, row_scale, opts: SparseOptions, call: PhaseCall, given, totals,
                want_grad: bool):
    rows, vocab = s.shape
    inv_t = 1.0 / opts.temperature
    zeros = torch.zeros(rows, dtype=torch.float32, device=s.device)
    local = ids - call.col_offset
    held = (ids >= 0) & (local >= 0) & (local < vocab)
    safe_ids = torch.where(held, local, torch.zeros_like(local))
    # This shard's columns off the ids (counted, not scattered: padding and other shards' ids all point at column 0).
    outside = torch.zeros_like(s, dtype=torch.int32).scatter_add(-1, safe_ids, held.to(torch.int32)) == 0
    if given is None:
        ref_s, log_z_s = divergences.log_normaliser(s, inv_t)
        log_z_rest = sparse_math.student_rest(
            torch.logsumexp(torch.where(outside, (s - ref_s) * inv_t, -math.inf), dim=-1, keepdim=True),
            ~outside.any(-1, keepdim=True))
    else:  # the global log-sum-exps (references 0)
        ref_s, log_z_s, log_z_rest = torch.zeros_like(given[:, :1]), given[:, 0:1], given[:, 1:2]
    ref_c, log_z_c = divergences.log_normaliser(s, 1.0) if given is None else (ref_s, given[:, 2:3])
    keep = labels != opts.ignore_index if labels is not None else None
    if call.phase == Phase.STATS:
        out = torch.stack([(ref_s * inv_t + log_z_s)[:, 0] if opts.has_kd else zeros,
                           (ref_s * inv_t + log_z_rest)[:, 0] if opts.has_kd else zeros,
                           (ref_c + log_z_c)[:, 0] if opts.has_ce else zeros, zeros], dim=-1)
        return (torch.where(keep[:, None], out, torch.zeros_like(out)) if keep is not None else out), None

    log_q = (s - ref_s) * inv_t - log_z_s
    kd = row_sum = id_gradients = rest_factor = None
    if opts.has_kd:
        # The rest 1 - sum(p) from float64 log-probs where a caller has them (a dense teacher's, method="mapped"):
        # float32 ones round each p by ~1e-7 of itself, as much as the reverse-KL floor of a rest.
        log_p_ids, log_p_rest = (x.float() for x in sparse_math.teacher_buckets(ids, logprobs, opts))
        log_q_ids = torch.where(held, log_q.gather(-1, safe_ids), torch.full_like(log_p_ids, -math.inf))
        log_q_buckets = torch.cat([log_q_ids, sparse_math.floored_rest(log_z_rest - log_z_s)], dim=-1)
        log_p_buckets = torch.cat([log_p_ids, log_p_rest[:, None]], dim=-1)
        owns_rest = torch.full_like(held[:, :1], call.col_offset == 0)
        counted = torch.cat([held, owns_rest], dim=-1)
        leader = sparse_math.column_leaders(local, held)
        kd, scores, row_sum = sparse_math.bucket_parts(log_q_buckets, log_p_buckets, counted, leader, opts,
                                                       centre=call.phase == Phase.FUSED)
        if call.phase == Phase.GRADIENT:
            row_sum = totals[:, 1]
        if want_grad:
            id_gradients, rest_factor = sparse_math.bucket_gradient(log_q_buckets, log_p_buckets, scores, row_sum,
                                                                    leader, opts)
    label_cols = torch_rows.label_columns(s, labels, ref_c, opts, call, zeros)
    q_log_q = None
    if call.phase != Phase.GRADIENT:  # the student's row is dense here too: its entropy is a dense teacher's
        q_log_q = torch_rows.entropy_q_log_q(s, log_q, ref_c, log_z_c, opts)
    grad = None
    if want_grad:
        grad = torch.zeros_like(s)
        if opts.has_kd:
            q = log_q.exp()
            # Every column takes q * rest_factor, the ids' columns their own gradient (the same value from every entry
            # of a column): written through one spare column that the ids another shard holds point at.
            kd_part = torch.cat([divergences.weighted(q, rest_factor[:, None].expand_as(q)), q[:, :1]], dim=-1)
            kd_part.scatter_(-1, torch.where(held, local, torch.full_like(local, vocab)), id_gradients)
            kd_part = kd_part[:, :vocab]
            grad += (opts.kd_scale * inv_t) * kd_part
        if opts.has_ce:
            torch_rows.add_ce_gradient(grad, s, ref_c, log_z_c, label_cols, opts)
        grad *= row_scale
    return torch_rows.phase_outputs(kd, row_sum, label_cols, ref_c, log_z_c, keep, grad, opts, call, zeros,
                                    q_log_q)


def sparse_forward_rows(student, teacher: SparseTargets, labels, grad_scale, grad, opts: SparseOptions,
                        call: PhaseCall = FUSED):
    batch, rows_per_batch, vocab = student.shape
    rows = batch * rows_per_batch
    shape = {Phase.FUSED: (rows, PART_COLUMNS), Phase.GRADIENT: (0,)}.get(call.phase, (rows, STAT_COLUMNS))
    out = torch.empty(shape, dtype=torch.float32, device=student.device)
    step = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    for b in range(batch):
        for start in range(0, rows_per_batch, step):
            stop = min(start + step, rows_per_batch)
            flat = slice(b * rows_per_batch + start, b * rows_per_batch + stop)
            chunk_out, chunk_grad = _chunk_rows(
                student[b, start:stop].float(), teacher.ids[b, start:stop], _widened(teacher.logprobs[b, start:stop]),
                labels[flat] if labels is not None else None, grad_scale, opts, call,
                call.row_stats[flat] if call.row_stats is not None else None,
                call.row_totals[flat] if call.row_totals is not None else None, grad is not None)
            if chunk_out is not None:
                out[flat] = chunk_out
            if grad is not None:
                grad[b, start:stop] = chunk_grad
    return out
