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
gradient [..., V] is kept for backward (the student's own storage with `inplace_backward=True` and one call). The rows
themselves are `kdfast.multi_teacher_rows`; traced by torch.compile they run as one custom op
(`kdfast.multi_teacher_ops`)."""

from __future__ import annotations

import torch

from kdfast.dispatch import rows_kernel_for
from kdfast.huge_pages import empty_gradient
from kdfast.kernel_abi import MAX_MIXED_TEACHERS
from kdfast.linear_ops import runs_as_op
from kdfast.multi_teacher_ops import CompiledMultiTeacherFunction
from kdfast.multi_teacher_rows import flat_rows, kept_and_reduced, multi_teacher_rows, runs_in_one_call
from kdfast.options import LossOptions
from kdfast.reduction import returned_with_teachers
from kdfast.saved_gradient import saved_gradient_times
from kdfast.teacher_routing import is_routing
from kdfast.teacher_weights import label_logprobs, row_log_weights, static_shares
from kdfast.validation import check_labels, check_labels_for, check_num_items, check_pair

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
    opts = LossOptions(divergence=divergence, beta=beta, temperature=temperature, kd_weight=kd_weight,
                       ce_weight=ce_weight, t2_scale=t2_scale, ignore_index=ignore_index, reduction=reduction,
                       inplace_backward=inplace_backward, backend=backend, return_components=return_components,
                       vocab_size=vocab_size, label_smoothing=label_smoothing, z_loss_weight=z_loss_weight)
    return multi_teacher_loss(student_logits, teacher_logits, labels, opts, weights=weights, combine=combine,
                              num_items_in_batch=num_items_in_batch, process_group=process_group,
                              vocab_range=vocab_range)


def check_combine(combine) -> None:
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")


def multi_teacher_loss(student_logits, teacher_logits, labels, opts: LossOptions, *, weights=None, combine="mixture",
                       num_items_in_batch=None, process_group=None, vocab_range=None):
    """`multi_teacher_distill_loss` with its loss settings already in one record."""
    check_combine(combine)
    teachers = teacher_list(teacher_logits)

    def check():
        check_teachers(student_logits, teachers, opts)
        if process_group is None:
            check_labels(labels, student_logits, opts)
        else:  # global token ids: their range is checked in the ranks' exchange, against the global vocabulary
            check_labels_for(labels, tuple(student_logits.shape[:-1]), 2**62, student_logits.device, opts,
                             "the logits")
        check_num_items(num_items_in_batch)

    if runs_as_op(process_group, vocab_range):  # traced by torch.compile: the rows as one custom op
        check()
        return _loss(CompiledMultiTeacherFunction, student_logits, teachers, labels, weights, combine,
                     num_items_in_batch, opts, None)
    return _host_driven_loss(student_logits, teachers, labels, weights, combine, num_items_in_batch, opts, check,
                             process_group, vocab_range)


# Driven from the host (a vocab shard's exchanges and agreement check): torch.compile runs the model around it and
# calls it as is, rather than tracing into it (README, "Backends").
@torch.compiler.disable
def _host_driven_loss(student_logits, teachers, labels, weights, combine, num_items_in_batch, opts, check,
                      process_group, vocab_range):
    kernel = rows_kernel_for(opts, check, lambda: student_logits.shape[-1], student_logits, labels, process_group,
                             vocab_range)
    return _loss(MultiTeacherFunction, student_logits, teachers, labels, weights, combine, num_items_in_batch, opts,
                 kernel)


def _loss(function, student_logits, teachers, labels, weights, combine, num_items_in_batch, opts, kernel):
    """The rows' log-weights of any weights mode (traced by a compiler: torch ops), then the Function."""
    width = opts.vocab_size or student_logits.shape[-1]

    def chunk(index, start, stop):
        return teachers[index].reshape(-1, teachers[index].shape[-1])[start:stop]

    lead_shape = tuple(student_logits.shape[:-1])
    log_weights = row_log_weights(weights, len(teachers), labels, lead_shape, opts, student_logits.device,
                                  lambda: label_logprobs(chunk, len(teachers), labels, width, opts,
                                                         getattr(kernel, "shard", None)))
    shares = None if is_routing(weights, lead_shape) else static_shares(weights, len(teachers))
    extra = () if kernel is None else (kernel,)
    return returned_with_teachers(function.apply(student_logits, labels, num_items_in_batch, opts, tuple(teachers),
                                                 log_weights, combine, shares, *extra), opts, labels)


class MultiTeacherFunction(torch.autograd.Function):
    """Forward runs the single-teacher op on the mixture (one `MixedTeachers` call over every row), or once per teacher,
    and keeps the gradient; backward rescales it."""

    @staticmethod
    def forward(ctx, student_logits, labels, num_items_in_batch, opts: LossOptions, teachers, log_weights, combine,
                shares, kernel):
        student, flat, scale = flat_rows(student_logits, labels, num_items_in_batch, opts)
        want_grad = ctx.needs_input_grad[0]
        # The average's calls each read the student: only one call can write over it.
        in_place = want_grad and opts.inplace_backward and runs_in_one_call(kernel, opts, combine)
        grad = (student if in_place else empty_gradient(student)) if want_grad else None
        parts, per_teacher = multi_teacher_rows(student, flat, scale, opts, teachers, log_weights, combine, shares,
                                                kernel, grad)
        return kept_and_reduced(ctx, grad, student_logits, parts, per_teacher, labels, opts, scale)

    @staticmethod
    def backward(ctx, grad_output, *summary_grads):
        return saved_gradient_times(ctx, grad_output), None, None, None, None, None, None, None, None


class MultiTeacherDistillLoss(torch.nn.Module):
    """`multi_teacher_distill_loss` with its settings fixed at construction: `combine`, `weights` (a `weights` given
    to `forward`, such as a batch's per-row tensor, takes their place), `process_group`, `vocab_range` and every loss
    setting of `distill_loss`."""

    def __init__(self, *, weights=None, combine="mixture", process_group=None, vocab_range=None, **settings):
        super().__init__()
        # Validated now, so a bad setting fails where the module is built rather than at the first step.
        self.options = LossOptions.build("MultiTeacherDistillLoss", **settings)
        check_combine(combine)
        self.weights, self.combine = weights, combine
        self.process_group, self.vocab_range = process_group, vocab_range

    def forward(self, student_logits, teacher_logits, labels=None, weights=None, num_items_in_batch=None):
        return multi_teacher_loss(student_logits, teacher_logits, labels, self.options,
                                  weights=self.weights if weights is None else weights, combine=self.combine,
                                  num_items_in_batch=num_items_in_batch, process_group=self.process_group,
                                  vocab_range=self.vocab_range)

    def extra_repr(self) -> str:
        o = self.options
        return (f"combine={self.combine!r}, weights={settings_repr(self.weights)}, divergence={o.divergence!r}, "
                f"beta={o.beta}, temperature={o.temperature}, kd_weight={o.kd_weight}, ce_weight={o.ce_weight}, "
                f"reduction={o.reduction!r}")


def settings_repr(weights) -> str:
    """Weights as a module's repr shows them: a tensor by its shape (its values may be many)."""
    return f"tensor{tuple(weights.shape)}" if isinstance(weights, torch.Tensor) else repr(weights)
