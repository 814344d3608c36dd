"""The loss contract in plain PyTorch, with the kernels' closed-form gradient, chunked over rows.

Works on any device; memory beyond inputs and gradient is a few float32 [chunk, vocab] temporaries.
"""

from __future__ import annotations

import math

import torch

from kdfast.options import LossOptions

# About 64 MiB of float32 per temporary: large enough to keep the vector units busy, small next to [N, V].
_CHUNK_ELEMENTS = 1 << 24


def _weighted(prob: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """prob * log_ratio with 0 * anything = 0 (teacher logits of -inf add nothing)."""
    return torch.where(prob == 0, torch.zeros_like(prob), prob * log_ratio)


def _log_mixture(log_a, log_b, weight_a: float):
    log_w = math.log(weight_a) if weight_a > 0 else -math.inf
    log_1mw = math.log1p(-weight_a) if weight_a < 1 else -math.inf
    return torch.logaddexp(log_a + log_w, log_b + log_1mw)


def kd_sums(ls, lt, opts: LossOptions):
    """Row sums over these vocab columns of the divergence's terms, and the elementwise u_j = q_j * dL/dq_j the
    gradient needs (None for forward and reverse KL), from log-probabilities `ls` (student) and `lt` (teacher)
    at T. Over a vocab shard (kdfast.vocab_parallel) the sums are partial and the caller adds them up."""
    beta, name = opts.beta, opts.effective_divergence
    if name == "forward_kl":
        return _weighted(lt.exp(), lt - ls).sum(-1), None
    if name == "reverse_kl":
        return _weighted(ls.exp(), ls - lt).sum(-1), None
    q, p = ls.exp(), lt.exp()
    if name == "jsd":
        lm = _log_mixture(lt, ls, beta)
        q_term = _weighted(q, ls - lm)
        return (beta * _weighted(p, lt - lm) + (1 - beta) * q_term).sum(-1), (1 - beta) * q_term
    if name == "skew_forward_kl":
        lm = _log_mixture(lt, ls, beta)
        # q * p / m in log space: q may underflow where p / m is huge (beta = 0: m = q).
        u = -(1 - beta) * torch.where(lm == -math.inf, torch.zeros_like(lm), (ls + lt - lm).exp())
        return _weighted(p, lt - lm).sum(-1), u
    lm = _log_mixture(ls, lt, beta)
    # beta * q / m as exp(log beta + ls - lm): at beta = 0, q / m may overflow (0 * inf).
    log_beta = math.log(beta) if beta > 0 else -math.inf
    return _weighted(q, ls - lm).sum(-1), _weighted(q, ls - lm - (ls - lm + log_beta).exp())


def kd_gradient(ls, lt, u, kd, u_sum, opts: LossOptions):
    """d(divergence)/d(s / T) from the whole row's divergence `kd` [R] and sum of u `u_sum` [R]."""
    name = opts.effective_divergence
    q = ls.exp()
    if name == "forward_kl":
        return q - lt.exp()
    if name == "reverse_kl":
        return _weighted(q, ls - lt - kd[:, None])
    # The rest: dL/da_j = u_j - q_j * sum(u).
    return u - q * u_sum[:, None]


def _kd_rows_and_grad(s, t, opts: LossOptions):
    """Divergence per row and d(divergence)/d(s / T), both float32."""
    inv_t = 1.0 / opts.temperature
    ls = torch.log_softmax(s * inv_t, dim=-1)
    lt = torch.log_softmax(t * inv_t, dim=-1)
    kd, u = kd_sums(ls, lt, opts)
    return kd, kd_gradient(ls, lt, u, kd, u.sum(-1) if u is not None else None, opts)


def _chunk_rows(s, t, labels, row_scale, opts: LossOptions, want_grad: bool):
    loss = torch.zeros(s.shape[0], dtype=torch.float32, device=s.device)
    grad = torch.zeros(s.shape, dtype=torch.float32, device=s.device) if want_grad else None
    if opts.has_kd:
        kd, kd_grad = _kd_rows_and_grad(s, t, opts)
        loss = loss + opts.kd_scale * kd
        if want_grad:
            grad += (opts.kd_scale / opts.temperature) * kd_grad
    if opts.has_ce:
        log_probs = torch.log_softmax(s, dim=-1)
        in_range = (labels >= 0) & (labels < s.shape[-1])
        safe = torch.where(in_range, labels, torch.zeros_like(labels))
        ce = -log_probs.gather(-1, safe[:, None]).squeeze(-1)
        # Out-of-range labels (refused on the host where that costs no sync) poison their row, never hide.
        loss = loss + opts.ce_weight * torch.where(in_range, ce, torch.full_like(ce, math.nan))
        if want_grad:
            ce_grad = log_probs.exp()
            ce_grad.scatter_add_(-1, safe[:, None], -torch.ones_like(ce[:, None]))
            grad += opts.ce_weight * ce_grad
    if labels is not None:
        keep = labels != opts.ignore_index
        loss = torch.where(keep, loss, torch.zeros_like(loss))
        if want_grad:
            grad = torch.where(keep[:, None], grad, torch.zeros_like(grad))
    if want_grad:
        grad = grad * row_scale
    return loss, grad


def forward_rows(student, teacher, labels, grad_scale, grad, opts: LossOptions) -> torch.Tensor:
    batch, rows_per_batch, vocab = student.shape
    loss_rows = torch.empty(batch * rows_per_batch, dtype=torch.float32, device=student.device)
    step = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    for b in range(batch):
        for start in range(0, rows_per_batch, step):
            stop = min(start + step, rows_per_batch)
            s = student[b, start:stop].float()
            t = teacher[b, start:stop].float() if opts.has_kd else None
            flat = slice(b * rows_per_batch + start, b * rows_per_batch + stop)
            chunk_labels = labels[flat] if labels is not None else None
            rows, chunk_grad = _chunk_rows(s, t, chunk_labels, grad_scale, opts, grad is not None)
            loss_rows[flat] = rows
            if grad is not None:
                grad[b, start:stop] = chunk_grad
    return loss_rows
