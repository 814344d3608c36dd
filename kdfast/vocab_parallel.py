"""The loss over a vocabulary split across ranks (DESIGN.md's contract, unchanged): each rank holds [rows,
V_shard] logits; ranks exchange O(rows) statistics, never logits.

Streaming passes over the local shard, in row chunks (PyTorch ops, float32):
1. local log-sum-exps of the student at T, the teacher at T and the student at 1 (CE) -> one all-gather of
   [rows, 3], combined into the global normalisers;
2. the divergence's partial row sums, the partial sum of u (the gradient's row term) and the label's logit
   (on the rank that holds it) -> one all-reduce of [rows, 3]; forward KL's and CE's gradient is written here;
3. for the other divergences, this rank's slice of the gradient from those global row values.
"""

from __future__ import annotations

import torch

from kdfast.backends.torch_backend import kd_gradient, kd_sums
from kdfast.distributed import VocabShard, all_gather, all_reduce_sum
from kdfast.function import reduced, saved_gradient_times
from kdfast.options import LossOptions

# float32 elements per temporary. On the CPU 1 MiB, so that the dozen elementwise ops of a pass run in L2
# (measured: 1.5x faster than 16 MiB chunks on 2048 x 16000); on a GPU large chunks, or launches dominate.
_CHUNK_ELEMENTS = {"cpu": 1 << 18, "cuda": 1 << 24}
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


def _chunks(rows: int, vocab: int, device: torch.device):
    step = max(1, _CHUNK_ELEMENTS.get(device.type, _CHUNK_ELEMENTS["cuda"]) // max(vocab, 1))
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
    lse = _global_log_sum_exps(student, teacher, opts, shard, inv_t)
    owned, local_labels = (_owned_labels(labels, shard, opts) if labels is not None and opts.has_ce
                           else (None, None))
    keep = labels != opts.ignore_index if labels is not None else None
    gradient = _GradientWriter(grad, student, lse, owned, local_labels, keep, grad_scale, opts, inv_t)
    # Forward KL's gradient (and CE's) needs no global row sum: it is written in the same pass as the partial
    # sums. The other divergences need the all-reduced sums first, so their gradient takes a third pass.
    one_pass = grad is not None and (not opts.has_kd or opts.effective_divergence == "forward_kl")
    partial = torch.zeros(rows, 3, dtype=torch.float32, device=device)
    if owned is not None:  # read before any gradient is written: the gradient may overwrite the logits
        label_logits = student.gather(-1, local_labels[:, None]).squeeze(-1).float()
        partial[:, 2] = torch.where(owned, label_logits, torch.zeros_like(label_logits))
    for chunk in _chunks(rows, shard.size, device):
        ls = lt = None
        if opts.has_kd:
            ls, lt = _log_probs(student, teacher, chunk, lse, inv_t)
            partial[chunk, 0], u = kd_sums(ls, lt, opts)
            if u is not None:
                partial[chunk, 1] = u.sum(-1)
        if one_pass:
            gradient.write(chunk, ls, lt, None, None)
    totals = all_reduce_sum(partial, shard.group)

    if grad is not None and not one_pass:
        for chunk in _chunks(rows, shard.size, device):
            ls, lt = _log_probs(student, teacher, chunk, lse, inv_t)
            u = kd_sums(ls, lt, opts)[1] if opts.effective_divergence not in _CLOSED_FORM else None
            gradient.write(chunk, ls, lt, u, totals[chunk])
    loss = torch.zeros(rows, dtype=torch.float32, device=device)
    if opts.has_kd:
        loss += opts.kd_scale * totals[:, 0]
    if opts.has_ce:
        loss += opts.ce_weight * (lse[:, 2] - totals[:, 2])
    return torch.where(keep, loss, torch.zeros_like(loss)) if keep is not None else loss


def _global_log_sum_exps(student, teacher, opts: LossOptions, shard: VocabShard, inv_t: float):
    """[rows, 3]: log-sum-exp over the whole vocabulary of the student at T, the teacher at T and the student at
    1, from each rank's local ones (one all-gather)."""
    local = torch.zeros(student.shape[0], 3, dtype=torch.float32, device=student.device)
    for chunk in _chunks(student.shape[0], shard.size, student.device):
        s = student[chunk].float()
        local[chunk, 0] = torch.logsumexp(s * inv_t, dim=-1)
        if opts.has_kd:
            local[chunk, 1] = torch.logsumexp(teacher[chunk].float() * inv_t, dim=-1)
        if opts.has_ce:
            local[chunk, 2] = torch.logsumexp(s, dim=-1)
    return torch.logsumexp(all_gather(local, shard.group), dim=0)


class _GradientWriter:
    """Writes grad[chunk] = grad_scale * (kd_scale / T * dKD/da + ce_weight * dCE/ds), zero at ignored rows."""

    def __init__(self, grad, student, lse, owned, local_labels, keep, grad_scale, opts: LossOptions, inv_t):
        self.grad, self.student, self.lse, self.owned, self.local_labels = grad, student, lse, owned, local_labels
        self.keep, self.grad_scale, self.opts, self.inv_t = keep, grad_scale, opts, inv_t

    def write(self, chunk, ls, lt, u, totals):
        opts, g = self.opts, None
        if opts.has_kd:
            kd, u_sum = (totals[:, 0], totals[:, 1]) if totals is not None else (None, None)
            g = kd_gradient(ls, lt, u, kd, u_sum, opts).mul_(opts.kd_scale * self.inv_t)
        if opts.has_ce:
            ce_grad = (self.student[chunk].float() - self.lse[chunk, 2:3]).exp_()
            if self.owned is not None:
                hit = self.owned[chunk].to(torch.float32)
                ce_grad.scatter_add_(-1, self.local_labels[chunk, None], -hit[:, None])
            g = ce_grad.mul_(opts.ce_weight) if g is None else g.add_(ce_grad, alpha=opts.ce_weight)
        if g is None:  # kd_weight = ce_weight = 0: a zero loss
            g = torch.zeros((chunk.stop - chunk.start, self.grad.shape[-1]), dtype=torch.float32,
                            device=self.grad.device)
        if self.keep is not None:
            g.masked_fill_(~self.keep[chunk, None], 0.0)  # a fill, not a product: NaN in an ignored row stays out
        self.grad[chunk] = g.mul_(self.grad_scale)


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
        return reduced(loss_rows, student_logits.shape[:-1], opts.reduction, scale)

    @staticmethod
    def backward(ctx, grad_output):
        return saved_gradient_times(ctx, grad_output), None, None, None, None, None
