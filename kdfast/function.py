"""The logits-level autograd Functions (a dense teacher's logits, or a sparse teacher's ids and log-probs): forward
runs the fused op (loss rows + gradient), backward only rescales."""

from __future__ import annotations

import torch

from kdfast import ops
from kdfast.options import LossOptions
from kdfast.reduction import reduced_outputs, reduction_scale
from kdfast.saved_gradient import saved_gradient_times
from kdfast.views import as_rows_view, flat_labels


def _fused_forward(ctx, student_logits, labels, num_items_in_batch, opts: LossOptions, fresh_op, inplace_op):
    """The shared forward: `fresh_op(student, labels, scale, want_grad)` returns (the rows' parts, gradient);
    `inplace_op(student, labels, scale)` writes the gradient over the student and returns the rows' parts."""
    lead_shape = student_logits.shape[:-1]
    student, student_copied = as_rows_view(student_logits)
    labels = flat_labels(labels)
    scale = reduction_scale(labels, student.shape[0] * student.shape[1], opts, num_items_in_batch, student.device)
    want_grad = ctx.needs_input_grad[0]
    grad = None
    if want_grad and opts.inplace_backward:
        parts = inplace_op(student, labels, scale)
        # The gradient now lives in the student's own storage (or in the copy, when one was needed). A detached alias,
        # not the logits themselves: autograd then takes it as the leaf's .grad as it is, where the tensor that
        # requires the gradient would be cloned (a full [N, V] copy, 20% of the call on the CPU).
        grad = student.reshape(student_logits.shape) if student_copied else student_logits.detach()
    else:
        parts, fresh = fresh_op(student, labels, scale, want_grad)
        if want_grad:
            grad = fresh.view(student_logits.shape)
    if grad is not None:
        ctx.save_for_backward(grad)
    ctx.reduction = opts.reduction
    return reduced_outputs(ctx, parts, lead_shape, labels, opts, scale)



class DistillFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, num_items_in_batch, opts: LossOptions):
        teacher, _ = as_rows_view(teacher_logits)
        settings = opts.encoded()
        return _fused_forward(
            ctx, student_logits, labels, num_items_in_batch, opts,
            lambda s, y, scale, want: ops.distill_forward(s, teacher, y, scale, want, settings),
            lambda s, y, scale: ops.distill_forward_inplace(s, teacher, y, scale, settings))

    @staticmethod
    def backward(ctx, grad_output, *summary_grad):
        return saved_gradient_times(ctx, grad_output), None, None, None, None


class SparseDistillFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_ids, teacher_logprobs, labels, num_items_in_batch, opts):
        ids, _ = as_rows_view(teacher_ids)
        logprobs, _ = as_rows_view(teacher_logprobs)
        settings = opts.encoded()
        return _fused_forward(
            ctx, student_logits, labels, num_items_in_batch, opts,
            lambda s, y, scale, want: ops.sparse_distill_forward(s, ids, logprobs, y, scale, want, settings),
            lambda s, y, scale: ops.sparse_distill_forward_inplace(s, ids, logprobs, y, scale, settings))

    @staticmethod
    def backward(ctx, grad_output, *summary_grad):
        return saved_gradient_times(ctx, grad_output), None, None, None, None, None
