"""The backward of the Functions whose gradient is computed in forward: the saved gradient times grad_output."""

from __future__ import annotations

import torch

from kdfast import ops


def saved_gradient_times(ctx, grad_output: torch.Tensor) -> torch.Tensor:
    """The gradient computed in forward, times grad_output (per row for "none"). In place: the buffer is ours
    (a retained graph's second backward after a scaling one is refused: `saved_gradients`)."""
    (grad,) = saved_gradients(ctx)
    if ctx.reduction == "none":
        grad.mul_(grad_output.unsqueeze(-1))
    else:
        rescale_gradient_(grad, grad_output)
    return grad


def saved_gradients(ctx) -> tuple:
    """The gradients a Function kept from its forward. A retained graph's second backward finds them rescaled by the
    first (in place: a copy of [N, V] per backward otherwise), and autograd refuses it; said in kdfast's terms."""
    try:
        return ctx.saved_tensors
    except RuntimeError as error:
        if "modified by an inplace operation" not in str(error):
            raise
        raise RuntimeError(
            "kdfast computes the loss's gradient in its forward and scales it by the backward's grad_output in place, "
            "so a graph retained for a second backward takes it again only where the first left it as it was (a "
            "grad_output of 1 on the CPU, reduction 'mean' or 'sum'): compute the loss again for each backward, or "
            "seed every backward with 1") from error


def rescale_gradient_(grad: torch.Tensor | None, grad_output: torch.Tensor) -> None:
    """grad *= grad_output (one element), skipping the pass when the factor is 1. Eager on the CPU the host reads it
    and leaves the gradient untouched (a retained graph's second backward then finds it as it was); on a GPU and in a
    compiled graph `ops.scale_gradient_` reads it where it runs (no host sync, and a graph cannot branch on a value:
    without the op a compiled backward paid a full pass over the gradient, 15% of its step on the CPU)."""
    if grad is None:
        return
    if grad.is_cuda or torch.compiler.is_compiling():
        ops.scale_gradient_(grad, grad_output)
    elif not _is_one_on_host(grad_output):
        grad.mul_(grad_output)


def _is_one_on_host(grad_output: torch.Tensor) -> bool:
    """True for the usual `loss.backward()` seed on a CPU tensor, whose read costs no device sync."""
    return grad_output.device.type == "cpu" and grad_output.numel() == 1 and bool(grad_output == 1)
