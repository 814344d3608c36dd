"""The loss contract in plain PyTorch (kdfast.divergences), every phase, chunked over rows.

Works on any device; memory beyond inputs and gradient is a few float32 [chunk, vocab] temporaries.
"""

from __future__ import annotations

import torch

from kdfast import divergences
from kdfast.backends import torch_rows
from kdfast.backends.torch_sparse import sparse_forward_rows  # noqa: F401 (the backend's sparse entry point)
from kdfast.kernel_abi import FUSED, PART_COLUMNS, STAT_COLUMNS, Phase, PhaseCall
from kdfast.options import LossOptions

# About 64 MiB of float32 per temporary: large enough to keep the vector units busy, small next to [N, V].
_CHUNK_ELEMENTS = 1 << 24


def _normalisers(x, inv_t, given):
    """(reference, log z) with log-probabilities (x - reference) / T - log z: from the rows themselves, or from
    the global log-sum-exps `given` [R] of a shard's later phases (reference 0)."""
    if given is None:
        return divergences.log_normaliser(x, inv_t)
    return torch.zeros_like(given[:, None]), given[:, None]


def _chunk_rows(s, t, labels, row_scale, opts: LossOptions, call: PhaseCall, given, totals, want_grad: bool):
    """This chunk's outputs ([R, PART_COLUMNS] for FUSED, [R, STAT_COLUMNS] for STATS and SUMS, None for GRADIENT)
    and gradient."""
    rows, vocab = s.shape
    inv_t = 1.0 / opts.temperature
    zeros = torch.zeros(rows, dtype=torch.float32, device=s.device)
    ref_s = log_z_s = ref_t = log_z_t = None
    if opts.has_kd:
        ref_s, log_z_s = _normalisers(s, inv_t, given[:, 0] if given is not None else None)
        ref_t, log_z_t = _normalisers(t, inv_t, given[:, 1] if given is not None else None)
    ref_c, log_z_c = _normalisers(s, 1.0, given[:, 2] if given is not None else None)
    keep = labels != opts.ignore_index if labels is not None else None
    if call.phase == Phase.STATS:
        columns = [(ref_s * inv_t + log_z_s)[:, 0] if opts.has_kd else zeros,
                   (ref_t * inv_t + log_z_t)[:, 0] if opts.has_kd else zeros,
                   (ref_c + log_z_c)[:, 0] if opts.has_ce else zeros, zeros]
        out = torch.stack(columns, dim=-1)
        return (torch.where(keep[:, None], out, torch.zeros_like(out)) if keep is not None else out), None

    kd = row_sum = ls = lt = scores = None
    if opts.has_kd:
        ls, lt = (s - ref_s) * inv_t - log_z_s, (t - ref_t) * inv_t - log_z_t
        kd, scores, row_sum = divergences.kd_parts(s, t, ls, lt, opts, centre=call.phase == Phase.FUSED)
        if call.phase == Phase.GRADIENT:
            row_sum = totals[:, 1]
    label_cols = torch_rows.label_columns(s, labels, ref_c, opts, call, zeros)
    q_log_q = None
    if call.phase != Phase.GRADIENT:
        q_log_q = torch_rows.entropy_q_log_q(s, ls, ref_c, log_z_c, opts)
    grad = None
    if want_grad:
        grad = torch.zeros_like(s)
        if opts.has_kd:
            grad += (opts.kd_scale * inv_t) * divergences.kd_gradient(ls, lt, scores, row_sum, opts)
        if opts.has_ce:
            torch_rows.add_ce_gradient(grad, s, ref_c, log_z_c, label_cols, opts)
        grad *= row_scale
    return torch_rows.phase_outputs(kd, row_sum, label_cols, ref_c, log_z_c, keep, grad, opts, call, zeros,
                                    q_log_q)


def forward_rows(student, teacher, labels, grad_scale, grad, opts: LossOptions, call: PhaseCall = FUSED):
    batch, rows_per_batch, vocab = student.shape
    rows = batch * rows_per_batch
    shape = {Phase.FUSED: (rows, PART_COLUMNS), Phase.GRADIENT: (0,)}.get(call.phase, (rows, STAT_COLUMNS))
    out = torch.empty(shape, dtype=torch.float32, device=student.device)
    step = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    for b in range(batch):
        for start in range(0, rows_per_batch, step):
            stop = min(start + step, rows_per_batch)
            flat = slice(b * rows_per_batch + start, b * rows_per_batch + stop)
            s = student[b, start:stop].float()
            t = teacher[b, start:stop].float() if opts.has_kd else None
            chunk_out, chunk_grad = _chunk_rows(
                s, t, labels[flat] if labels is not None else None, grad_scale, opts, call,
                call.row_stats[flat] if call.row_stats is not None else None,
                call.row_totals[flat] if call.row_totals is not None else None, grad is not None)
            if chunk_out is not None:
                out[flat] = chunk_out
            if grad is not None:
                grad[b, start:stop] = chunk_grad
    return out
