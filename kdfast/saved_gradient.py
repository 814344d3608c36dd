"""The backward of the Functions whose gradient is computed in forward: the saved gradient times grad_output."""

from __future__ import annotations

import torch

from kdfast import ops


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
    """grad *= grad_output (one element), skipping the pass when the factor is 1 (`ops.scale_gradient_`: the value is
    read where the op runs, so that neither eager nor compiled code branches on it; a compiled backward paid that full
    pass over the gradient, 15% of its step on the CPU)."""
    if grad is not None:
        ops.scale_gradient_(grad, grad_output)
