"""Several teachers at once: `multi_teacher_distill_loss`. combine="mixture" takes the divergence to the teachers'
mixture p_bar = sum_m w_m p_m (probabilities at T); combine="average" the weighted sum of each teacher's divergence,
sum_m w_m D(p_m || q). Weights: `kdfast.teacher_weights`.

A mixture is a teacher kind the one fused path carries (`kernel_abi.MixedTeachers`): the rows kernel of the chosen
backend takes the M teachers and the rows' log-weights in the place of one teacher's logits. The C++ kernel mixes each
row in its own scratch (M exps and one log per column beside the student's exp; nothing of [N, V] written), the
Triton kernel at each read of the teacher (kernels/mixture.py); CUDA and torch mix a chunk of rows into
T * log p_bar (`teacher_mixture.py`), logits whose softmax at T is p_bar, and run their single-teacher kernel on it:
the divergence, the CE, the gradient, every numerical guard come with the kernel. "average" runs the single-teacher
op once per teacher (and once for the CE) and weighs each row's divergence and gradient; under forward KL, where the
kernel writes each teacher's own divergence, it is the mixture's one call (`dispatch.average_runs_as_mixture`). One
gradient [..., V] is kept for backward (the student's own storage with `inplace_backward=True` and one call)."""

from __future__ import annotations

import torch

from kdfast.dispatch import (
    average_of_teacher_divergences,
    average_runs_as_mixture,
    rows_kernel_for,
    teacher_divergences_in_kernel,
)
from kdfast.huge_pages import empty_gradient
from kdfast.kernel_abi import (
    MAX_MIXED_TEACHERS,
    PART_CE,
    PART_COLUMNS,
    PART_CORRECT,
    PART_ENTROPY,
    PART_KD,
    PART_Z,
    MixedTeachers,
)
from kdfast.options import LossOptions
from kdfast.reduction import reduced_with_teachers, reduction_scale, returned_with_teachers
from kdfast.saved_gradient import saved_gradient_times
from kdfast.teacher_routing import is_routing
from kdfast.teacher_weights import label_logprobs, row_log_weights, static_shares
from kdfast.validation import check_labels, check_labels_for, check_num_items, check_pair
from kdfast.views import flat_labels

COMBINES = ("mixture", "average")


def teacher_list(teacher_logits) -> list:
    """The M teachers as a list of tensors: a list/tuple as given, a tensor [M, ..., V] unbound (views)."""
    if isinstance(teacher_logits, torch.Tensor):
        if teacher_logits.dim() < 2:
            raise ValueError(f"teacher_logits as one tensor must be [M, ..., vocab], got shape "
                             f"{tuple(teacher_logits.shape)}")
        teachers = list(teacher_logits.unbind(0))
    elif not isinstance(teacher_logits, (list, tuple)) or not teacher_logits:
        raise ValueError(f"teacher_logits must be a non-empty list/tuple of M tensors [..., vocab] or one tensor "
                         f"[M, ..., vocab], got {type(teacher_logits).__name__}")
    else:
        teachers = list(teacher_logits)
    if len(teachers) > MAX_MIXED_TEACHERS:  # what one kernel call mixes (kernel_abi.h)
        raise ValueError(f"teacher_logits holds {len(teachers)} teachers; at most {MAX_MIXED_TEACHERS} are taken")
    return teachers


def check_teachers(student_logits, teachers: list, opts: LossOptions) -> None:
    for index, teacher in enumerate(teachers):
        if not isinstance(teacher, torch.Tensor):
            raise ValueError(f"teacher_logits[{index}] must be a tensor, got {type(teacher).__name__}")
        try:
            check_pair(student_logits, teacher, opts)
        except ValueError as error:
            raise ValueError(f"teacher_logits[{index}]: {error}") from None
        if teacher.shape != teachers[0].shape:
            raise ValueError(f"teacher_logits[{index}] has shape {tuple(teacher.shape)} but teacher_logits[0] "
                             f"{tuple(teachers[0].shape)}: the teachers must have one shape")


# Driven from the host (a kernel object, several calls or chunks): torch.compile runs the model around it and calls
# it as is, rather than tracing into it (README, "Backends").
@torch.compiler.disable
def multi_teacher_distill_loss(student_logits, teacher_logits, labels=None, *, weights=None, combine="mixture",
                               divergence="forward_kl", beta=0.5, temperature=1.0, kd_weight=1.0, ce_weight=0.0,
                               t2_scale=True, ignore_index=-100, reduction="mean", num_items_in_batch=None,
                               inplace_backward=False, backend="auto", return_components=False, vocab_size=None,
                               label_smoothing=0.0, z_loss_weight=0.0, process_group=None, vocab_range=None):
    """`distill_loss` against M teachers (a list/tuple of M tensors [..., V], or one tensor [M, ..., V]).

    weights: None (1/M each), M numbers, a tensor [..., M] (per row, e.g. a routing one-hot), each row's teacher (an
    integer tensor [...]: its one-hot; `linear_multi_teacher_distill_loss` runs the row's own head alone),
    "confidence" (per row w_m proportional to p_m(label) at T = 1) or "min_ce" (per row all weight on the teacher with
    the lowest CE on the label; ties: the lowest index); normalised per row, no gradient. combine: "mixture"
    (divergence(p_bar || q), p_bar = sum_m w_m p_m at T) or "average" (sum_m w_m divergence(p_m || q)). With M = 1
    both are `distill_loss`. `return_components=True` adds `teachers`: each teacher's own divergence, reduced as the
    loss ([M], or [..., M] with reduction="none"). `inplace_backward=True` writes the mixture's gradient over
    `student_logits` (as `distill_loss` does; the average's calls each read them, so it keeps a buffer). Vocab
    parallel: with a `process_group` every logits tensor is this rank's shard (`vocab_range`, or the shards in rank
    order, as in `distill_loss`), each teacher normalised over the ranks by an exchange of 8 bytes per row and
    teacher."""
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
    opts = LossOptions(divergence=divergence, beta=beta, temperature=temperature, kd_weight=kd_weight,
                       ce_weight=ce_weight, t2_scale=t2_scale, ignore_index=ignore_index, reduction=reduction,
                       inplace_backward=inplace_backward, backend=backend, return_components=return_components,
                       vocab_size=vocab_size, label_smoothing=label_smoothing, z_loss_weight=z_loss_weight)
    teachers = teacher_list(teacher_logits)

    def check():
        check_teachers(student_logits, teachers, opts)
        if process_group is None:
            check_labels(labels, student_logits, opts)
        else:  # global token ids: their range is checked in the ranks' exchange, against the global vocabulary
            check_labels_for(labels, tuple(student_logits.shape[:-1]), 2**62, student_logits.device, opts,
                             "the logits")
        check_num_items(num_items_in_batch)

    kernel = rows_kernel_for(opts, check, lambda: student_logits.shape[-1], student_logits, labels, process_group,
                             vocab_range)
    width = opts.vocab_size or student_logits.shape[-1]
    def chunk(index, start, stop):
        return teachers[index].reshape(-1, teachers[index].shape[-1])[start:stop]

    log_weights = row_log_weights(weights, len(teachers), labels, tuple(student_logits.shape[:-1]), opts,
                                  student_logits.device, lambda: label_logprobs(chunk, len(teachers), labels, width,
                                                                                opts, getattr(kernel, "shard", None)))
    shares = None if is_routing(weights, tuple(student_logits.shape[:-1])) else static_shares(weights, len(teachers))
    return returned_with_teachers(MultiTeacherFunction.apply(student_logits, labels, num_items_in_batch, opts,
                                                             tuple(teachers), log_weights, combine, shares, kernel),
                                  opts, labels)


class MultiTeacherFunction(torch.autograd.Function):
    """Forward runs the single-teacher op on the mixture (one `MixedTeachers` call over every row), or once per teacher,
    and keeps the gradient; backward rescales it."""

    @staticmethod
    def forward(ctx, student_logits, labels, num_items_in_batch, opts: LossOptions, teachers, log_weights, combine,
                shares, kernel):
        lead_shape, vocab = student_logits.shape[:-1], student_logits.shape[-1]
        width = opts.vocab_size or vocab
        student = student_logits.reshape(-1, vocab)
        flat = flat_labels(labels)
        rows = student.shape[0]
        every_row = slice(0, rows)
        scale = reduction_scale(flat, rows, opts, num_items_in_batch, student.device)
        want_grad = ctx.needs_input_grad[0]
        one_call = combine == "mixture" or average_runs_as_mixture(kernel, opts.replace(vocab_size=None))
        # The average's calls each read the student: only one call can write over it.
        in_place = want_grad and opts.inplace_backward and one_call
        grad = (student if in_place else empty_gradient(student)) if want_grad else None
        call = _ChunkCall(student, flat, scale, opts.replace(vocab_size=None, inplace_backward=False), width, grad,
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
        elif one_call:  # the average under forward KL: the mixture's gradient, the teachers' own divergences weighed
            parts = call.run(every_row, MixedTeachers(tuple(teacher_rows), log_weights, per_teacher), call.opts)
            parts[:, PART_KD] = average_of_teacher_divergences(per_teacher, log_weights)
        else:
            parts = _average_chunk(call, every_row, teacher_rows, log_weights, opts, per_teacher, shares)
        if grad is not None and width < vocab:
            grad[:, width:] = 0.0  # padding columns: in no softmax
        if opts.return_components and not opts.has_kd:
            per_teacher.zero_()
        if grad is not None:
            ctx.save_for_backward(grad.view(student_logits.shape))
        ctx.reduction = opts.reduction
        return reduced_with_teachers(ctx, parts, per_teacher, lead_shape, labels, opts, scale)

    @staticmethod
    def backward(ctx, grad_output, *summary_grads):
        return saved_gradient_times(ctx, grad_output), None, None, None, None, None, None, None, None


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
