"""The [batch, rows, vocab] views the kernels take."""

from __future__ import annotations

import torch


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


def flat_labels(labels: torch.Tensor | None) -> torch.Tensor | None:
    """Labels as the kernels take them: contiguous int64, one per row."""
    return labels.reshape(-1).to(torch.int64).contiguous() if labels is not None else None
