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
