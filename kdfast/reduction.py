"""The reductions, shared by every autograd Function: the factor the summed loss (and so the gradient) takes,
computed on the device (no host sync), and the loss returned."""

from __future__ import annotations

import torch

from kdfast.options import LossOptions


def reduction_scale(labels, rows: int, opts: LossOptions, num_items_in_batch, device) -> torch.Tensor:
    """1 for "sum" and "none"; for "mean", 1 / num_items_in_batch, else 1 / kept rows (at least 1: never NaN)."""
    if opts.reduction != "mean":
        return torch.ones((), dtype=torch.float32, device=device)
    if num_items_in_batch is not None:
        denominator = torch.as_tensor(num_items_in_batch, device=device).to(torch.float32)
    elif labels is not None:
        denominator = (labels != opts.ignore_index).sum().clamp(min=1).to(torch.float32)
    else:
        denominator = torch.tensor(float(max(rows, 1)), device=device)
    return 1.0 / denominator


def reduced(loss_rows: torch.Tensor, lead_shape, reduction: str, scale: torch.Tensor) -> torch.Tensor:
    """The returned loss: rows shaped like the labels ("none"), their sum, or their sum times the scale."""
    if reduction == "none":
        return loss_rows.view(lead_shape)
    total = loss_rows.sum()
    return total * scale if reduction == "mean" else total
