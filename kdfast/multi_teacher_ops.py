"""The logits-level loss of several teachers (`multi_teacher_distill_loss`) as torch.library custom ops, so that a
torch.compile'd step traces through it whole (`fullgraph=True` included), as `kdfast.ops` does for one teacher.

Two ops, as there: `kdfast::multi_teacher_forward` returns the rows' loss parts, a fresh gradient and each teacher's
own divergence per row; `kdfast::multi_teacher_forward_inplace` writes the gradient over the student's rows. Both run
`multi_teacher_rows.multi_teacher_rows` with the device's rows kernel, resolved inside the op (the compiler never
traces a build); the teachers are a tensor list, their rows' log-weights [N, M] computed while tracing (any weights
mode), the average's static shares a float list (none: per-row weights)."""

from __future__ import annotations

import torch

from kdfast.dispatch import device_rows
from kdfast.huge_pages import empty_gradient
from kdfast.kernel_abi import PART_COLUMNS
from kdfast.multi_teacher_rows import flat_rows, kept_and_reduced, multi_teacher_rows, runs_in_one_call
from kdfast.options import LossOptions
from kdfast.saved_gradient import saved_gradient_times

# Written out: torch 2.4's schema inference takes no list annotations.
_INPUTS = ("Tensor[] teachers, Tensor log_weights, Tensor? labels, Tensor grad_scale, str combine, float[]? shares, "
           "str settings")
_SCHEMA = f"(Tensor student, {_INPUTS}, bool want_grad) -> (Tensor, Tensor, Tensor)"
_INPLACE_SCHEMA = f"(Tensor(a!) student, {_INPUTS}) -> (Tensor, Tensor)"


def _rows(student, teachers, log_weights, labels, grad_scale, combine, shares, settings, grad):
    opts = LossOptions.decode(settings)
    return multi_teacher_rows(student, labels, grad_scale, opts, teachers, log_weights, combine,
                              tuple(shares) if shares is not None else None, device_rows(opts, student.device), grad)


@torch.library.custom_op("kdfast::multi_teacher_forward", mutates_args=(), schema=_SCHEMA)
def multi_teacher_forward(student, teachers, log_weights, labels, grad_scale, combine, shares, settings, want_grad):
    """The student's rows [N, V] and M teachers' [N, V] in; the rows' loss parts [N, PART_COLUMNS] float32, the
    gradient (or an empty tensor) and each teacher's own divergence [N, M] float32."""
    grad = empty_gradient(student) if want_grad else None
    parts, per_teacher = _rows(student, teachers, log_weights, labels, grad_scale, combine, shares, settings, grad)
    return parts, grad if grad is not None else student.new_empty(0), per_teacher


@multi_teacher_forward.register_fake
def _(student, teachers, log_weights, labels, grad_scale, combine, shares, settings, want_grad):
    parts, per_teacher = _fake_outputs(student, teachers)
    return parts, torch.empty_like(student) if want_grad else student.new_empty(0), per_teacher


@torch.library.custom_op("kdfast::multi_teacher_forward_inplace", mutates_args=("student",), schema=_INPLACE_SCHEMA)
def multi_teacher_forward_inplace(student, teachers, log_weights, labels, grad_scale, combine, shares, settings):
    """Like multi_teacher_forward, but the gradient overwrites `student`: written there by the one call of the
    mixture, or copied there when the average's calls each read the student."""
    opts = LossOptions.decode(settings)
    one_call = runs_in_one_call(device_rows(opts, student.device), opts, combine)
    grad = student if one_call else empty_gradient(student)
    parts, per_teacher = _rows(student, teachers, log_weights, labels, grad_scale, combine, shares, settings, grad)
    if not one_call:
        student.copy_(grad)
    return parts, per_teacher


@multi_teacher_forward_inplace.register_fake
def _(student, teachers, log_weights, labels, grad_scale, combine, shares, settings):
    return _fake_outputs(student, teachers)


def _fake_outputs(student, teachers):
    rows = student.shape[0]
    return (student.new_empty(rows, PART_COLUMNS, dtype=torch.float32),
            student.new_empty(rows, len(teachers), dtype=torch.float32))


class CompiledMultiTeacherFunction(torch.autograd.Function):
    """`MultiTeacherFunction` through the ops: forward keeps the gradient, backward rescales it."""

    @staticmethod
    def forward(ctx, student_logits, labels, num_items_in_batch, opts: LossOptions, teachers, log_weights, combine,
                shares):
        student, flat, scale = flat_rows(student_logits, labels, num_items_in_batch, opts)
        inputs = (list(teachers), log_weights, flat, scale, combine, list(shares) if shares is not None else None,
                  opts.encoded())
        if ctx.needs_input_grad[0] and opts.inplace_backward:
            parts, per_teacher = multi_teacher_forward_inplace(student, *inputs)
            grad = student
        else:
            parts, fresh, per_teacher = multi_teacher_forward(student, *inputs, ctx.needs_input_grad[0])
            grad = fresh if ctx.needs_input_grad[0] else None
        return kept_and_reduced(ctx, grad, student_logits, parts, per_teacher, labels, opts, scale)

    @staticmethod
    def backward(ctx, grad_output, *summary_grads):
        return saved_gradient_times(ctx, grad_output), None, None, None, None, None, None, None
