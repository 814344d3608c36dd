"""Each token's cross-entropy scaled by a detached factor of the model's own prediction: `token_scaling="dft"`,
Dynamic Fine-Tuning (Wu et al. 2025; TRL's SFT `loss_type="dft"`, Liger-Kernel's fused linear CE
`use_token_scaling=True`): a kept row's loss and gradient times p(label), the probability of its label under
softmax of the (mapped) logits at T = 1, with no gradient through the factor. As Liger-Kernel scales them: the CE
(label smoothing's included) and the z-loss are scaled, "mean" still divides by the kept rows (or
num_items_in_batch), the entropy and the accuracy are not scaled, and per-class weights multiply the row as before.

No kernel reads the setting. The rows go through kdfast.class_weights' weighing (unit weights without
`class_weights`), whose kernel runs the plain CE: each row's kernel CE is then lse - x_y, so p(label) = exp(-CE) is
read from the parts the kernel already wrote, and it scales the row's weighed parts and every share of its
gradient. Without label smoothing this adds no pass over the logits; with it, the weighing's one (the smoothing's
linear term)."""

from __future__ import annotations

import copy

import torch

from kdfast.class_weights import ClassWeightedRows
from kdfast.kernel_abi import PART_CE, PART_Z
from kdfast.options import LossOptions

TOKEN_SCALINGS = ("dft",)


def check_token_scaling(token_scaling) -> None:
    """None, or one of TOKEN_SCALINGS."""
    if token_scaling is not None and token_scaling not in TOKEN_SCALINGS:
        raise ValueError(f"token_scaling must be None or one of {list(TOKEN_SCALINGS)} (\"dft\": each token's loss "
                         f"times its label's detached probability, Liger-Kernel's use_token_scaling=True), got "
                         f"{token_scaling!r}")


class ProbabilityScaledRows:
    """`token_scaling="dft"` over weighed rows (kdfast.class_weights.ClassWeightedRows, whose protocol it keeps): each
    chunk's factors p(label) = exp(-CE) from the kernel's plain CE, before the inner weighing changes it."""

    tensor = None

    def __init__(self, inner: ClassWeightedRows):
        self.inner = inner
        self.kernel_options, self.denominator = inner.kernel_options, inner.denominator
        self.scales = torch.zeros_like(inner.factors)  # p(label) per row; 0 where ignored

    def for_upstream(self, grad_output: torch.Tensor) -> ProbabilityScaledRows:
        rerun = copy.copy(self)
        rerun.inner = self.inner.for_upstream(grad_output)
        rerun.scales = torch.zeros_like(self.scales)
        return rerun

    def observe(self, rows: slice, logits: torch.Tensor) -> None:
        self.inner.observe(rows, logits)

    def of_chunk(self, rows: slice, parts: torch.Tensor) -> torch.Tensor:
        scales = torch.where(self.inner.kept[rows], torch.exp(-parts[:, PART_CE]), 0.0)
        self.scales[rows] = scales
        factors = self.inner.of_chunk(rows, parts)
        parts[:, PART_CE] *= scales
        parts[:, PART_Z] *= scales
        return factors * scales

    def add_to_gradient_(self, rows: slice, grad: torch.Tensor, scale: torch.Tensor) -> None:
        self.inner.add_to_gradient_(rows, grad, scale * self.scales[rows])


def weighed_rows(class_weights, token_scaling, labels: torch.Tensor, opts: LossOptions, num_items_in_batch,
                 vocab: int):
    """The rows' weighing for per-class weights and / or a token scaling (checked by the caller), None for neither.
    `labels` flat [N]; `vocab` the classes (the logits' columns less any padding)."""
    if class_weights is None and token_scaling is None:
        return None
    if class_weights is None:  # the weighing's algebra with unit weights is the plain CE's
        class_weights = torch.ones(vocab, dtype=torch.float32, device=labels.device)
    weighted = ClassWeightedRows(class_weights, labels, opts, num_items_in_batch)
    return weighted if token_scaling is None else ProbabilityScaledRows(weighted)
