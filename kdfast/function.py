"""The logits-level autograd Function: forward runs the fused op (loss rows + gradient), backward only rescales."""

from __future__ import annotations

import torch

from kdfast import ops
from kdfast.options import LossOptions
from kdfast.reduction import reduced, reduction_scale
from kdfast.saved_gradient import saved_gradient_times
from kdfast.views import as_rows_view, flat_labels


class DistillFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, num_items_in_batch, opts: LossOptions):
        lead_shape = student_logits.shape[:-1]
        student, student_copied = as_rows_view(student_logits)
        teacher, _ = as_rows_view(teacher_logits)
        labels = flat_labels(labels)
        scale = reduction_scale(labels, student.shape[0] * student.shape[1], opts, num_items_in_batch,
                                student.device)
        want_grad = ctx.needs_input_grad[0]
        grad = None
        if want_grad and opts.inplace_backward:
            loss_rows = ops.distill_forward_inplace(student, teacher, labels, scale, opts.encoded())
            # The gradient now lives in the student's own storage (or in the copy, when one was needed).
            grad = student.reshape(student_logits.shape) if student_copied else student_logits
        else:
            loss_rows, fresh = ops.distill_forward(student, teacher, labels, scale, want_grad, opts.encoded())
            if want_grad:
                grad = fresh.view(student_logits.shape)
        if grad is not None:
            ctx.save_for_backward(grad)
        ctx.reduction = opts.reduction
        return reduced(loss_rows, lead_shape, opts.reduction, scale)

    @staticmethod
    def backward(ctx, grad_output):
        return saved_gradient_times(ctx, grad_output), None, None, None, None
