"""Each token's cross-entropy scaled by a detached factor of the model's own prediction (`token_scaling=`):

- "dft", Dynamic Fine-Tuning (Wu et al. 2025; TRL's SFT `loss_type="dft"`, Liger-Kernel's fused linear CE
  `use_token_scaling=True`): p(label), the probability of the row's label under softmax of the (mapped) logits;
- "eaft" or `EAFT(alpha, top_k)`, Entropy-Adaptive Fine-Tuning (LlamaFactory's `use_eaft_loss`, ms-swift's
  `enable_eaft_loss`, Liger-Kernel's `use_eaft`): (H_k / 3)^alpha, H_k the entropy of softmax over the row's top_k
  logits (their default k = 20, alpha = 1; 3 is about ln 20, their normaliser).

As the peers scale them: a kept row's loss (label smoothing's CE and the z-loss included) and gradient times the
factor, with no gradient through it; "mean" still divides by the kept rows (or num_items_in_batch); the entropy and
the accuracy are not scaled; per-class weights multiply the row as before.

No kernel reads the setting. The rows go through kdfast.class_weights' weighing (unit weights without
`class_weights`), whose kernel runs the plain CE: each row's kernel CE is then lse - x_y, so DFT's p(label) =
exp(-CE) is read from the parts the kernel already wrote (no pass over the logits); EAFT's top-k is read from the
logits before the kernel overwrites them (`observe`). The factor then scales the row's weighed parts and every share
of its gradient."""

from __future__ import annotations

import copy
import dataclasses
import math

import torch

from kdfast.class_weights import ClassWeightedRows
from kdfast.kernel_abi import PART_CE, PART_Z
from kdfast.native_build import loaded_cpu_ops_for
from kdfast.options import LossOptions

EAFT_NORMALISER = 3.0  # the peers' divisor of the top-k entropy (about ln 20, the top-20's largest)


@dataclasses.dataclass(frozen=True)
class EAFT:
    """Entropy-Adaptive Fine-Tuning's factor (H_k / 3)^alpha: `token_scaling=kdfast.EAFT(alpha=0.5, top_k=10)`
    (`token_scaling="eaft"`: these defaults, the peers')."""

    alpha: float = 1.0
    top_k: int = 20

    def __post_init__(self):
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not (
                math.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"EAFT alpha must be a finite number >= 0 (the entropy factor's exponent), got "
                             f"{self.alpha!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"EAFT top_k must be an int >= 1 (the logits whose entropy is taken), got "
                             f"{self.top_k!r}")

    def of_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The factor per row of logits [n, V], float32. On the CPU's float32 rows one pass of the extension's
        (csrc/cpu/topk_entropy.h: torch.topk was most of an EAFT call's cost); else the top-k taken in the logits'
        own dtype (the same values, exactly widened), so that 16-bit rows are not widened whole, and unsorted (the
        entropy does not care; sorting took 73 ms against 57 at 2048 x 32000 fp32 on two threads)."""
        k = min(self.top_k, logits.shape[-1])
        ops = loaded_cpu_ops_for(logits, rows_only=True)
        if ops is not None:
            entropy = ops.topk_entropy(logits, k)
        else:
            log_probs = torch.log_softmax(logits.topk(k, dim=-1, sorted=False).values.float(), dim=-1)
            entropy = -(log_probs.exp() * log_probs).sum(-1)
        return torch.pow(entropy / EAFT_NORMALISER, self.alpha)


def token_scaling_of(token_scaling):
    """None, "dft", or an EAFT ("eaft": its defaults); anything else is refused by name."""
    if token_scaling is None or token_scaling == "dft" or isinstance(token_scaling, EAFT):
        return token_scaling
    if token_scaling == "eaft":
        return EAFT()
    raise ValueError(f"token_scaling must be None, \"dft\" (each token's loss times its label's detached probability, "
                     f"Liger-Kernel's use_token_scaling=True), \"eaft\" or kdfast.EAFT(alpha, top_k) (times its "
                     f"top-k entropy over 3, to the alpha), got {token_scaling!r}")


def check_token_scaling(token_scaling) -> None:
    token_scaling_of(token_scaling)


class ScaledRows:
    """A token scaling over weighed rows (kdfast.class_weights.ClassWeightedRows, whose protocol it keeps): each row's
    factor (DFT's from the kernel's plain CE before the inner weighing changes it, EAFT's from the logits) scales
    its weighed parts and its gradient."""

    tensor = None

    def __init__(self, inner: ClassWeightedRows, scaling):
        self.inner, self.scaling = inner, scaling
        self.kernel_options, self.denominator = inner.kernel_options, inner.denominator
        self.scales = torch.zeros_like(inner.factors)  # per row; 0 where ignored

    def for_upstream(self, grad_output: torch.Tensor) -> ScaledRows:
        rerun = copy.copy(self)
        rerun.inner = self.inner.for_upstream(grad_output)
        rerun.scales = torch.zeros_like(self.scales)
        return rerun

    def observe(self, rows: slice, logits: torch.Tensor) -> None:
        self.inner.observe(rows, logits)
        if isinstance(self.scaling, EAFT):
            scales = self.scaling.of_logits(logits[:, :self.inner.vocab])
            self.scales[rows] = torch.where(self.inner.kept[rows], scales, 0.0)

    def of_chunk(self, rows: slice, parts: torch.Tensor) -> torch.Tensor:
        if self.scaling == "dft":
            self.scales[rows] = torch.where(self.inner.kept[rows], torch.exp(-parts[:, PART_CE]), 0.0)
        scales = self.scales[rows]
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
    token_scaling = token_scaling_of(token_scaling)
    if class_weights is None and token_scaling is None:
        return None
    if class_weights is None:  # the weighing's algebra with unit weights is the plain CE's
        class_weights = torch.ones(vocab, dtype=torch.float32, device=labels.device)
    weighted = ClassWeightedRows(class_weights, labels, opts, num_items_in_batch)
    return weighted if token_scaling is None else ScaledRows(weighted, token_scaling)
