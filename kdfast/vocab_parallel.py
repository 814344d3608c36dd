"""The loss over a vocabulary split across ranks (docs/DESIGN.md, "Shards and phases"): each rank holds [rows,
V_shard] logits; ranks exchange O(rows) statistics, never logits. The math is the backends' own kernels, run in
phases over the shard's columns:

1. STATS: local log-sum-exps of the student at T, the teacher at T and the student at 1 -> one all-gather of
   [rows, STAT_COLUMNS], combined into the global ones;
2. SUMS: the divergence's partial row sums, D (the gradient's row sum), the label's logit on the rank that
   holds it and the shard's sum q log q (minus the ranks' total is the student's entropy) -> one all-reduce of
   [rows, STAT_COLUMNS]; forward KL's and CE's gradient is written in the same pass;
3. GRADIENT (reverse KL and the mixtures): this rank's slice of the gradient from those global row values.
"""

from __future__ import annotations

import math

import torch

from kdfast.distributed import VocabShard, all_gather, all_reduce_max, all_reduce_sum
from kdfast.huge_pages import empty_gradient
from kdfast.kernel_abi import (
    FUSED,
    PART_CE,
    PART_COLUMNS,
    PART_CORRECT,
    PART_ENTROPY,
    PART_KD,
    PART_Z,
    SUM_ENTROPY,
    MixedTeachers,
    Phase,
    PhaseCall,
)
from kdfast.options import LossOptions
from kdfast.reduction import reduced_outputs
from kdfast.saved_gradient import saved_gradient_times
from kdfast.views import as_rows_view, flat_labels


def sharded_rows(kernel, student, teacher, labels, grad_scale, grad, opts: LossOptions, shard: VocabShard):
    """The rows' loss parts [N, PART_COLUMNS] (float32, identical on every rank) and, into `grad` ([batch, rows,
    V_shard] views, like the logits) when given, this rank's slice of d(loss)/d(student logits) times grad_scale.
    `kernel` is a device's rows kernel (kdfast.dispatch.DeviceRows)."""
    # Token accuracy needs the row's global max and the label's logit, which no phase exchanges (SUMS carries the CE
    # target's logit, smoothed or not): one more read of the shard (before SUMS may write the gradient over it) and
    # an all-reduce of [rows, 2], paid only when the components are asked for.
    want_accuracy = labels is not None and opts.return_components
    label_and_max = _label_logit_and_max(student, labels, shard) if want_accuracy else None
    stats = kernel(student, teacher, labels, grad_scale, None, opts, PhaseCall(Phase.STATS, shard.start))
    lse = torch.logsumexp(all_gather(stats, shard.group), dim=0)
    one_pass = grad is not None and not opts.gradient_needs_row_sums
    sums = kernel(student, teacher, labels, grad_scale, grad if one_pass else None, opts,
                  PhaseCall(Phase.SUMS, shard.start, row_stats=lse, global_vocab=shard.vocab))
    totals = all_reduce_sum(sums, shard.group)
    if grad is not None and not one_pass:
        kernel(student, teacher, labels, grad_scale, grad, opts,
               PhaseCall(Phase.GRADIENT, shard.start, lse, totals, global_vocab=shard.vocab))
    parts = torch.zeros(lse.shape[0], PART_COLUMNS, dtype=torch.float32, device=lse.device)
    if opts.has_kd:
        parts[:, PART_KD] = totals[:, 0]
    if opts.needs_labels:
        parts[:, PART_CE] = lse[:, 2] - totals[:, 2]
    if opts.z_loss_weight != 0.0:
        parts[:, PART_Z] = lse[:, 2] ** 2
    if opts.has_kd or opts.has_ce:
        parts[:, PART_ENTROPY] = -totals[:, SUM_ENTROPY]  # the shards' sum q log q over the whole row
    if want_accuracy:
        label_logit, row_max = all_reduce_max(label_and_max, shard.group).unbind(-1)
        held = (labels >= 0) & (labels < shard.vocab)
        parts[:, PART_CORRECT] = (held & (label_logit >= row_max)).float()
    if labels is not None:
        parts = torch.where((labels != opts.ignore_index)[:, None], parts, torch.zeros_like(parts))
    return parts


def _label_logit_and_max(student, labels, shard: VocabShard) -> torch.Tensor:
    """[rows, 2]: the label's logit where this shard holds it (else -inf) and the shard's largest logit, to be
    max-reduced over the ranks."""
    batch, rows_per_batch, _ = student.shape
    local = (labels - shard.start).view(batch, rows_per_batch, 1)
    held = (local >= 0) & (local < shard.size)
    label_logit = student.gather(-1, torch.where(held, local, torch.zeros_like(local))).float()
    label_logit = torch.where(held, label_logit, torch.full_like(label_logit, -math.inf))
    return torch.cat([label_logit, student.amax(-1, keepdim=True).float()], dim=-1).reshape(-1, 2)


class ShardedRows:
    """The rows kernel of a vocab shard, with DeviceRows' interface, for the fused linear loss's chunks."""

    def __init__(self, kernel, shard: VocabShard):
        self.kernel, self.shard = kernel, shard

    def __call__(self, student, teacher, labels, grad_scale, grad, opts: LossOptions, call: PhaseCall = FUSED):
        """`teacher`: a dense teacher's shard, a sparse teacher's SparseTargets, or several teachers' shards
        (MixedTeachers), mixed a chunk of rows at a time into one dense teacher normalised over every rank."""
        if isinstance(teacher, MixedTeachers):
            from kdfast.teacher_mixture import mixture_rows_by_chunks

            return mixture_rows_by_chunks(self, student, teacher, labels, grad_scale, grad, opts, call, self.shard)
        return sharded_rows(self.kernel, student, teacher, labels, grad_scale, grad, opts, self.shard)

    def reduce_hidden_grad(self, d_hidden):
        """Each rank's d hidden covers its vocab shard only; the full gradient is their sum, unless the caller's own
        tensor-parallel layer does that reduction (reduce_hidden_grad=False)."""
        if d_hidden is None or not self.shard.reduce_hidden_grad:
            return d_hidden
        return all_reduce_sum(d_hidden, self.shard.group)


class ShardedDistillFunction(torch.autograd.Function):
    """`distill_loss` over vocab shards: gradient in forward, backward rescales (like DistillFunction)."""

    @staticmethod
    def forward(ctx, student_logits, teacher, labels, scale, opts: LossOptions, shard: VocabShard, kernel):
        """`teacher`: the teacher's logits over this shard's columns, or a sparse teacher's SparseTargets."""
        student, copied = as_rows_view(student_logits)
        if isinstance(teacher, torch.Tensor):
            teacher = as_rows_view(teacher)[0]
        grad = None
        if ctx.needs_input_grad[0]:
            grad = student
            if not opts.inplace_backward:
                grad = empty_gradient(student)
        labels = flat_labels(labels)
        parts = sharded_rows(kernel, student, teacher, labels, scale, grad, opts, shard)
        if grad is not None:
            in_place = grad is student and not copied
            ctx.save_for_backward(student_logits if in_place else grad.reshape(student_logits.shape))
        ctx.reduction = opts.reduction
        return reduced_outputs(ctx, parts, student_logits.shape[:-1], labels, opts, scale)

    @staticmethod
    def backward(ctx, grad_output, *summary_grad):
        return saved_gradient_times(ctx, grad_output), None, None, None, None, None, None
