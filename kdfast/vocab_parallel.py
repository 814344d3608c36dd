"""The loss over a vocabulary split across ranks (DESIGN.md's contract, unchanged): each rank holds [rows,
V_shard] logits; ranks exchange O(rows) statistics, never logits.

Three streaming passes over the local shard, in row chunks (PyTorch ops, float32):
1. local log-sum-exps of the student at T, the teacher at T and the student at 1 (CE) -> one all-gather of
   [rows, 3], combined into the global normalisers;
2. the divergence's partial row sums, the partial sum of u (the gradient's row term) and the label's logit
   (on the rank that holds it) -> one all-reduce of [rows, 3];
3. this rank's slice of the gradient from those global row values.
"""

from __future__ import annotations

import torch

from kdfast.backends.torch_backend import kd_gradient, kd_sums
from kdfast.distributed import VocabShard, all_gather, all_reduce_sum
from kdfast.options import LossOptions

_CHUNK_ELEMENTS = 1 << 22  # float32 elements per temporary: 16 MiB
_CLOSED_FORM = ("forward_kl", "reverse_kl")  # their gradient needs no elementwise u


class ShardKernel:
    """`forward_rows` with the backends' signature, over this rank's vocab shard."""

    def __init__(self, shard: VocabShard):
        self.shard = shard

    def forward_rows(self, student, teacher, labels, grad_scale, grad, opts: LossOptions) -> torch.Tensor:
        vocab = student.shape[-1]
        student2d, teacher2d = student.reshape(-1, vocab), teacher.reshape(-1, vocab)
        grad2d = None
        if grad is not None:
            grad2d = grad.view(-1, vocab)  # the callers pass contiguous gradient buffers
        return sharded_rows(student2d, teacher2d, labels, grad_scale, grad2d, opts, self.shard)


def _chunks(rows: int, vocab: int):
    step = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def _owned_labels(labels, shard: VocabShard, opts: LossOptions):
    """(this rank holds the label, its local column, clamped to 0 where not held)."""
    owned = (labels >= shard.start) & (labels < shard.stop) & (labels != opts.ignore_index)
    local = torch.where(owned, labels - shard.start, torch.zeros_like(labels))
    return owned, local


def sharded_rows(student, teacher, labels, grad_scale, grad, opts: LossOptions, shard: VocabShard):
    """Loss rows [N] (float32, identical on every rank) and, into `grad` [N, V_shard] when given, this rank's
    slice of d(loss)/d(student logits) times grad_scale."""
    rows, device = student.shape[0], student.device
    inv_t = 1.0 / opts.temperature
    local_lse = torch.zeros(rows, 3, dtype=torch.float32, device=device)
    for chunk in _chunks(rows, shard.size):
        s = student[chunk].float()
        local_lse[chunk, 0] = torch.logsumexp(s * inv_t, dim=-1)
        if opts.has_kd:
            local_lse[chunk, 1] = torch.logsumexp(teacher[chunk].float() * inv_t, dim=-1)
        if opts.has_ce:
            local_lse[chunk, 2] = torch.logsumexp(s, dim=-1)
    lse = torch.logsumexp(all_gather(local_lse, shard.group), dim=0)

    owned, local_labels = (_owned_labels(labels, shard, opts) if labels is not None and opts.has_ce
                           else (None, None))
    partial = torch.zeros(rows, 3, dtype=torch.float32, device=device)
    for chunk in _chunks(rows, shard.size):
        if opts.has_kd:
            ls, lt = _log_probs(student, teacher, chunk, lse, inv_t)
            partial[chunk, 0], u = kd_sums(ls, lt, opts)
            if u is not None:
                partial[chunk, 1] = u.sum(-1)
    if owned is not None:
        label_logits = student.gather(-1, local_labels[:, None]).squeeze(-1).float()
        partial[:, 2] = torch.where(owned, label_logits, torch.zeros_like(label_logits))
    totals = all_reduce_sum(partial, shard.group)

    loss = torch.zeros(rows, dtype=torch.float32, device=device)
    if opts.has_kd:
        loss += opts.kd_scale * totals[:, 0]
    if opts.has_ce:
        loss += opts.ce_weight * (lse[:, 2] - totals[:, 2])
    keep = labels != opts.ignore_index if labels is not None else None
    if keep is not None:
        loss = torch.where(keep, loss, torch.zeros_like(loss))
    if grad is None:
        return loss

    for chunk in _chunks(rows, shard.size):
        g = None
        if opts.has_kd:
            ls, lt = _log_probs(student, teacher, chunk, lse, inv_t)
            u = kd_sums(ls, lt, opts)[1] if opts.effective_divergence not in _CLOSED_FORM else None
            g = kd_gradient(ls, lt, u, totals[chunk, 0], totals[chunk, 1], opts).mul_(opts.kd_scale * inv_t)
        if opts.has_ce:
            ce_grad = (student[chunk].float() - lse[chunk, 2:3]).exp_()
            if owned is not None:
                hit = owned[chunk].to(torch.float32)
                ce_grad.scatter_add_(-1, local_labels[chunk, None], -hit[:, None])
            g = ce_grad.mul_(opts.ce_weight) if g is None else g.add_(ce_grad, alpha=opts.ce_weight)
        if g is None:  # kd_weight = ce_weight = 0: a zero loss
            g = torch.zeros((chunk.stop - chunk.start, shard.size), dtype=torch.float32, device=device)
        if keep is not None:
            g.masked_fill_(~keep[chunk, None], 0.0)  # a fill, not a product: NaN in an ignored row stays out
        grad[chunk] = g.mul_(grad_scale)
    return loss


def _log_probs(student, teacher, chunk, lse, inv_t):
    """Log-probabilities at T against the global normalisers (a shard of -inf teacher logits, a padded vocab
    tail, gives -inf: p = 0 there)."""
    return (student[chunk].float() * inv_t - lse[chunk, 0:1], teacher[chunk].float() * inv_t - lse[chunk, 1:2])


class ShardedDistillFunction(torch.autograd.Function):
    """`distill_loss` over vocab shards: gradient in forward, backward rescales (like DistillFunction)."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, scale, opts: LossOptions, shard: VocabShard):
        vocab = student_logits.shape[-1]
        student, teacher = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
        flat_labels = labels.reshape(-1).to(torch.int64) if labels is not None else None
        grad = None
        if ctx.needs_input_grad[0]:
            in_place = opts.inplace_backward and student.data_ptr() == student_logits.data_ptr() and \
                student.is_contiguous()
            grad = student if in_place else torch.empty_like(student, memory_format=torch.contiguous_format)
        loss_rows = sharded_rows(student, teacher, flat_labels, scale, grad, opts, shard)
        if grad is not None:
            ctx.save_for_backward(grad.view(student_logits.shape))
        ctx.reduction = opts.reduction
        if opts.reduction == "none":
            return loss_rows.view(student_logits.shape[:-1])
        total = loss_rows.sum()
        return total * scale if opts.reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_output):
        from kdfast.function import rescale_gradient_

        (grad,) = ctx.saved_tensors
        if ctx.reduction == "none":
            grad.mul_(grad_output.unsqueeze(-1))
        else:
            rescale_gradient_(grad, grad_output)
        return grad, None, None, None, None, None
