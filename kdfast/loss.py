"""The public API: `distill_loss` and its `nn.Module`, `DistillLoss`."""

from __future__ import annotations

import torch

from kdfast.function import DistillFunction
from kdfast.options import LossOptions
from kdfast.validation import check_labels, check_num_items, check_pair


def distill_loss(student_logits, teacher_logits, labels=None, *, divergence="forward_kl", beta=0.5,
                 temperature=1.0, kd_weight=1.0, ce_weight=0.0, t2_scale=True, ignore_index=-100,
                 reduction="mean", num_items_in_batch=None, inplace_backward=False, backend="auto"):
    """Fused distillation loss over [..., vocab] logits (DESIGN.md, "The loss").

    total = kd_weight * (T^2 if t2_scale else 1) * divergence(teacher || student at T)
            + ce_weight * cross_entropy(student at T=1, labels)
    Rows whose label is `ignore_index` contribute nothing. reduction "mean" divides by the kept rows (or by
    `num_items_in_batch`), "sum" sums, "none" returns per-row values shaped like the labels.
    The gradient is computed in the forward pass; `inplace_backward=True` writes it over the student
    logits' storage (no [tokens, vocab] allocation), so nothing else may need those logits afterwards.
    """
    opts = LossOptions(divergence=divergence, beta=beta, temperature=temperature, kd_weight=kd_weight,
                       ce_weight=ce_weight, t2_scale=t2_scale, ignore_index=ignore_index, reduction=reduction,
                       inplace_backward=inplace_backward, backend=backend)
    check_pair(student_logits, teacher_logits, opts)
    check_labels(labels, student_logits, opts)
    check_num_items(num_items_in_batch)
    return DistillFunction.apply(student_logits, teacher_logits.detach(), labels, num_items_in_batch, opts)


class DistillLoss(torch.nn.Module):
    """`distill_loss` with its settings fixed at construction."""

    def __init__(self, *, divergence="forward_kl", beta=0.5, temperature=1.0, kd_weight=1.0, ce_weight=0.0,
                 t2_scale=True, ignore_index=-100, reduction="mean", inplace_backward=False, backend="auto"):
        super().__init__()
        # Validated now, so a bad setting fails where the module is built rather than at the first step.
        self.options = LossOptions(divergence=divergence, beta=beta, temperature=temperature,
                                   kd_weight=kd_weight, ce_weight=ce_weight, t2_scale=t2_scale,
                                   ignore_index=ignore_index, reduction=reduction,
                                   inplace_backward=inplace_backward, backend=backend)

    def forward(self, student_logits, teacher_logits, labels=None, num_items_in_batch=None):
        return distill_loss(student_logits, teacher_logits, labels, num_items_in_batch=num_items_in_batch,
                            **self.options.__dict__)

    def extra_repr(self) -> str:
        o = self.options
        return (f"divergence={o.divergence!r}, beta={o.beta}, temperature={o.temperature}, "
                f"kd_weight={o.kd_weight}, ce_weight={o.ce_weight}, reduction={o.reduction!r}")
