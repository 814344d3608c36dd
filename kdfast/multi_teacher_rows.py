"""The rows of several teachers' loss, shared by `multi_teacher_distill_loss`'s eager Function and its custom ops
(`kdfast.multi_teacher_ops`): the mixture as one `MixedTeachers` call of the device's rows kernel, or the average as
one call per teacher, each gradient written (or added, times the rows' weights) straight into one buffer."""

from __future__ import annotations

import torch

from kdfast.dispatch import average_of_teacher_divergences, average_runs_as_mixture, teacher_divergences_in_kernel
from kdfast.kernel_abi import PART_CE, PART_COLUMNS, PART_CORRECT, PART_ENTROPY, PART_KD, PART_Z, MixedTeachers
from kdfast.options import LossOptions
from kdfast.reduction import reduced_with_teachers, reduction_scale
from kdfast.views import flat_labels


def flat_rows(student_logits, labels, num_items_in_batch, opts: LossOptions) -> tuple:
    """A several-teacher Function's inputs as its rows take them: the student's rows [N, V], the labels flat and the
    reduction's factor."""
    student = student_logits.reshape(-1, student_logits.shape[-1])
    flat = flat_labels(labels)
    return student, flat, reduction_scale(flat, student.shape[0], opts, num_items_in_batch, student.device)


def kept_and_reduced(ctx, grad, student_logits, parts, per_teacher, labels, opts: LossOptions, scale):
    """A several-teacher Function's outputs from its rows' parts, the gradient (or None) kept for its backward."""
    if grad is not None:
        ctx.save_for_backward(grad.view(student_logits.shape))
    ctx.reduction = opts.reduction
    return reduced_with_teachers(ctx, parts, per_teacher, student_logits.shape[:-1], labels, opts, scale)


def runs_in_one_call(kernel, opts: LossOptions, combine: str) -> bool:
    """Whether the rows kernel runs once over the teachers (the mixture, or an average that runs as one)."""
    return combine == "mixture" or average_runs_as_mixture(kernel, opts.replace(vocab_size=None))


def multi_teacher_rows(student, labels, scale, opts: LossOptions, teachers, log_weights, combine: str,
                       shares: tuple | None, kernel, grad) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of M teachers over the rows [N, V] of `student` (labels flat, `scale` the reduction's): the rows'
    parts [N, PART_COLUMNS] and each teacher's own divergence [N, M] (zeros unless the components ask for them), the
    gradient written into `grad` ([N, V], the student itself for an in-place one call, or None)."""
    rows = student.shape[0]
    width = opts.vocab_size or student.shape[-1]
    every_row = slice(0, rows)
    call = _ChunkCall(student, labels, scale, opts.replace(vocab_size=None, inplace_backward=False), width, grad,
                      kernel)
    teacher_rows = [teacher.reshape(-1, teacher.shape[-1])[:, :width] for teacher in teachers]
    per_teacher = torch.zeros(rows, len(teachers), device=student.device)
    if combine == "mixture":
        wanted = opts.return_components and opts.has_kd
        in_kernel = wanted and teacher_divergences_in_kernel(kernel, call.opts)
        if wanted and not in_kernel:  # before an in-place gradient overwrites the student
            for index, one in enumerate(teacher_rows):
                per_teacher[:, index] = call.divergence(every_row, one)
        mixed = MixedTeachers(tuple(teacher_rows), log_weights, per_teacher if in_kernel else None)
        parts = call.run(every_row, mixed, call.opts)
    elif runs_in_one_call(kernel, opts, combine):  # forward KL: the mixture's gradient, the teachers' own divergences
        parts = call.run(every_row, MixedTeachers(tuple(teacher_rows), log_weights, per_teacher), call.opts)
        parts[:, PART_KD] = average_of_teacher_divergences(per_teacher, log_weights)
    else:
        parts = _average_chunk(call, every_row, teacher_rows, log_weights, opts, per_teacher, shares)
    if grad is not None and width < student.shape[-1]:
        grad[:, width:] = 0.0  # padding columns: in no softmax
    if opts.return_components and not opts.has_kd:
        per_teacher.zero_()
    return parts, per_teacher


def _batched(teacher):
    """A [rows, V] teacher (or several) as the [1, rows, V] batch the rows kernels take."""
    if isinstance(teacher, MixedTeachers):
        return MixedTeachers(tuple(one.unsqueeze(0) for one in teacher.teachers), teacher.log_weights,
                             teacher.divergences)
    return teacher.unsqueeze(0)


class _ChunkCall:
    """The single-teacher kernel on a chunk of rows, its gradient written (or added, times a row weight) straight into
    `grad`: the device's rows kernel (kdfast.dispatch) takes an output buffer, so no chunk's gradient is allocated
    and copied."""

    def __init__(self, student, labels, scale, opts: LossOptions, width: int, grad, rows_kernel):
        self.student, self.labels, self.scale, self.opts, self.width, self.grad = \
            student, labels, scale, opts, width, grad
        self.rows_kernel = rows_kernel  # the device's (kdfast.dispatch) or a vocab shard's (kdfast.vocab_parallel)
        self.scratch = None  # for gradients that are added, not written: allocated once

    def run(self, span: slice, teacher: torch.Tensor, opts: LossOptions, row_weight=None,
            accumulate: bool = False) -> torch.Tensor:
        """The kernel on `span`; its gradient (times `row_weight` per row) written into those rows of `grad`, or added
        to what an earlier call wrote there (`accumulate`)."""
        student = self.student[span, :self.width].unsqueeze(0)  # a view: the kernels take a row stride
        labels = self.labels[span] if self.labels is not None else None
        if self.grad is None:
            return self.rows_kernel(student, _batched(teacher), labels, self.scale, None, opts)
        target = self.grad[span, :self.width]
        direct = not accumulate and row_weight is None
        if not direct and self.scratch is None:
            self.scratch = torch.empty_like(target)
        out = target if direct else self.scratch[:target.shape[0]]
        parts = self.rows_kernel(student, _batched(teacher), labels, self.scale, out.unsqueeze(0), opts)
        if direct:
            return parts
        if row_weight is None:
            target.add_(out)
        elif accumulate:
            target.addcmul_(out, row_weight[:, None].to(out.dtype))
        else:
            torch.mul(out, row_weight[:, None].to(out.dtype), out=target)
        return parts

    @torch.no_grad()
    def divergence(self, span: slice, teacher: torch.Tensor) -> torch.Tensor:
        """One teacher's divergence per row (for logging: no gradient)."""
        logits = teacher[span]
        student = self.student[span, :self.width].unsqueeze(0)
        labels = self.labels[span] if self.labels is not None else None
        kd_only = self.opts.replace(ce_weight=0.0, z_loss_weight=0.0, label_smoothing=0.0)
        return self.rows_kernel(student, logits.unsqueeze(0), labels, self.scale, None, kd_only)[:, PART_KD]


def _average_chunk(call: _ChunkCall, span: slice, teachers: list, log_weights, opts: LossOptions,
                   per_teacher: torch.Tensor, shares: tuple | None) -> torch.Tensor:
    """sum_m w_m (divergence and gradient of teacher m) per row, and the CE family once: the chunk's parts. With the
    same weights in every row, known to the host (`shares`, all > 0), each call's divergence weight is w_m times the
    loss's (its gradient comes weighted: the first call writes it, the others add theirs, no pass rescales a gradient)
    and the CE rides in the call of the heaviest teacher, which goes first; other weights scale each call's gradient
    by its row's w_m and take a CE call of its own."""
    weights = log_weights[span].exp()
    parts = torch.zeros(span.stop - span.start, PART_COLUMNS, device=weights.device)
    has_ce = opts.needs_labels or opts.z_loss_weight != 0.0
    if not opts.has_kd and not has_ce:  # no term: one call writes the zero gradient and the student's parts
        return call.run(span, teachers[0][span], call.opts)
    folded = shares is not None and min(shares) > 0.0
    carrier = max(range(len(shares)), key=shares.__getitem__) if has_ce and folded and opts.has_kd else None
    if opts.has_kd:
        kd_only = call.opts.replace(ce_weight=0.0, z_loss_weight=0.0, label_smoothing=0.0)
        order = sorted(range(len(teachers)), key=lambda index: index != carrier)  # the carrier's call first
        for position, index in enumerate(order):
            logits = teachers[index][span]
            if not folded:
                teacher_parts = call.run(span, logits, kd_only, row_weight=weights[:, index], accumulate=position > 0)
            else:
                settings = call.opts if index == carrier else kd_only
                settings = settings.replace(kd_weight=call.opts.kd_weight * shares[index])
                teacher_parts = call.run(span, logits, settings, accumulate=position > 0)
            per_teacher[span, index] = teacher_parts[:, PART_KD]
            parts[:, PART_KD] += weights[:, index] * teacher_parts[:, PART_KD]
            # The student's entropy and accuracy: the same from every call.
            parts[:, [PART_ENTROPY, PART_CORRECT]] = teacher_parts[:, [PART_ENTROPY, PART_CORRECT]]
            if index == carrier:
                parts[:, [PART_CE, PART_Z]] = teacher_parts[:, [PART_CE, PART_Z]]
    if has_ce and carrier is None:
        logits = teachers[0][span]
        ce_parts = call.run(span, logits, call.opts.replace(kd_weight=0.0), accumulate=opts.has_kd)
        if opts.has_kd:
            ce_parts[:, [PART_KD, PART_ENTROPY]] = parts[:, [PART_KD, PART_ENTROPY]]
        parts = ce_parts
    return parts
