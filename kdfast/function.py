"""The autograd Function: forward runs the fused op (loss rows + gradient), backward only rescales."""

from __future__ import annotations

import torch

from kdfast import ops
from kdfast.options import LossOptions


def as_rows_view(logits: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A [batch, rows, vocab] view with vocab stride 1, and whether a copy was needed to get one.

    `logits[:, :-1]` (the usual causal shift) stays a view: the kernels take a batch and a row stride.
    """
    # A vocab of 1 has no vocab stride to speak of (and .contiguous() may hand such a tensor back as is).
    if logits.stride(-1) != 1 and logits.shape[-1] > 1:
        return as_rows_view(logits.contiguous())[0], True
    if logits.dim() == 2:
        return logits.unsqueeze(0), False
    if logits.dim() == 3:
        return logits, False
    try:
        return logits.view(-1, logits.shape[-2], logits.shape[-1]), False
    except RuntimeError:
        return logits.reshape(-1, logits.shape[-2], logits.shape[-1]), True


def reduction_scale(labels, rows: int, opts: LossOptions, num_items_in_batch, device) -> torch.Tensor:
    """The factor the summed loss (and so the gradient) is multiplied by, as a device tensor: no sync."""
    if opts.reduction != "mean":
        return torch.ones((), dtype=torch.float32, device=device)
    if num_items_in_batch is not None:
        denominator = torch.as_tensor(num_items_in_batch, device=device).to(torch.float32)
    elif labels is not None:
        denominator = (labels != opts.ignore_index).sum().clamp(min=1).to(torch.float32)
    else:
        denominator = torch.tensor(float(max(rows, 1)), device=device)
    return 1.0 / denominator


class DistillFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, num_items_in_batch, opts: LossOptions):
        lead_shape = student_logits.shape[:-1]
        student, student_copied = as_rows_view(student_logits)
        teacher, _ = as_rows_view(teacher_logits)
        flat_labels = labels.reshape(-1).to(torch.int64).contiguous() if labels is not None else None
        scale = reduction_scale(flat_labels, student.shape[0] * student.shape[1], opts, num_items_in_batch,
                                student.device)
        settings = (opts.divergence, float(opts.beta), float(opts.temperature), float(opts.kd_weight),
                    float(opts.ce_weight), bool(opts.t2_scale), int(opts.ignore_index), opts.backend)
        want_grad = ctx.needs_input_grad[0]
        grad = None
        if want_grad and opts.inplace_backward:
            loss_rows = ops.distill_forward_inplace(student, teacher, flat_labels, scale, *settings)
            # The gradient now lives in the student's own storage (or in the copy, when one was needed).
            grad = student.reshape(student_logits.shape) if student_copied else student_logits
        else:
            loss_rows, fresh = ops.distill_forward(student, teacher, flat_labels, scale, want_grad, *settings)
            if want_grad:
                grad = fresh.view(student_logits.shape)
        if grad is not None:
            ctx.save_for_backward(grad)
        ctx.reduction = opts.reduction
        return reduced(loss_rows, lead_shape, opts.reduction, scale)

    @staticmethod
    def backward(ctx, grad_output):
        return saved_gradient_times(ctx, grad_output), None, None, None, None


def reduced(loss_rows: torch.Tensor, lead_shape, reduction: str, scale: torch.Tensor) -> torch.Tensor:
    """The returned loss: rows shaped like the labels ("none"), their sum, or their sum times the scale."""
    if reduction == "none":
        return loss_rows.view(lead_shape)
    total = loss_rows.sum()
    return total * scale if reduction == "mean" else total


def saved_gradient_times(ctx, grad_output: torch.Tensor) -> torch.Tensor:
    """The gradient computed in forward, times grad_output (per row for "none"). In place: the buffer is ours
    and used once (a retained second backward is refused by autograd's version check on the saved tensor)."""
    (grad,) = ctx.saved_tensors
    if ctx.reduction == "none":
        grad.mul_(grad_output.unsqueeze(-1))
    else:
        rescale_gradient_(grad, grad_output)
    return grad


def rescale_gradient_(grad: torch.Tensor | None, grad_output: torch.Tensor) -> None:
    """grad *= grad_output (one element), skipping the pass when the factor is 1: on a GPU the kernel reads it
    (no host sync), on the CPU the host does."""
    if grad is None:
        return
    if grad.is_cuda:
        ops.scale_gradient_(grad, grad_output)
    elif not _is_one_on_host(grad_output):
        grad.mul_(grad_output)


def _is_one_on_host(grad_output: torch.Tensor) -> bool:
    """True for the usual `loss.backward()` seed on a CPU tensor, whose read costs no device sync: the
    [N, V] rescale by 1 is then skipped (a full extra pass over the gradient otherwise)."""
    if torch.compiler.is_compiling() or grad_output.device.type != "cpu" or grad_output.numel() != 1:
        return False
    return bool(grad_output == 1)
