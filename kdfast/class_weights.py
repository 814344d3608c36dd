"""Per-class weights on the cross-entropy, as `F.cross_entropy(weight=)` takes them (Liger-Kernel's `weight` and its
fused linear CE's `ce_weight`): a kept row's CE times w[label], label smoothing's uniform target weighted by w, and
"mean" dividing by the kept rows' label weights. The z-loss, the entropy and the accuracy stay as without weights
(means over the kept rows), as Liger-Kernel computes them. No kernel reads the weights: the plain CE kernel runs (no
smoothing, no z-loss) and its rows and gradient are weighed after it, a chunk at a time in the chunked forms.

The algebra, for a row with logits x, log-sum-exp lse = CE + x_y, label y (eps = label_smoothing, V classes, W =
sum_c w_c, q = softmax(x); D the weighted denominator, n the kept rows, z the z-loss weight):
    (1 - eps) w_y (lse - x_y) + eps / V * sum_c w_c (lse - x_c) = a (lse - x_y) + eps / V * (W x_y - w . x),
    a = (1 - eps) w_y + eps W / V,
so the loss is the kernel's CE times a, plus a term linear in the logits, plus z lse^2 (over n rather than D). Its
gradient, in units of the kernel's k (q - onehot_y) with k = 1 / D: a (q - onehot_y) + eps / V (W onehot_y - w) +
b q with b = 2 z lse D / n; as q = (kernel's) / k + onehot_y, that is the kernel's gradient times a + b, plus
k (eps W / V + b) at the label and the rank-one -k eps / V w, all in place."""

from __future__ import annotations

import copy
import dataclasses

import torch

from kdfast.kernel_abi import PART_CE, PART_ENTROPY, PART_Z
from kdfast.options import LossOptions

# Rows of 16-bit logits widened to float32 at a time for the smoothing's dot products (a bounded copy, not [N, V]).
DOT_SLICE_BYTES = 16 * 2**20


def check_class_weights(class_weights, vocab: int, device=None) -> None:
    """None, or floats [vocab] (on `device` where given), finite (read on the CPU), of any sign (as PyTorch and
    Liger-Kernel take them)."""
    if class_weights is None:
        return
    if not isinstance(class_weights, torch.Tensor) or not class_weights.is_floating_point():
        got = (f"dtype {class_weights.dtype}" if isinstance(class_weights, torch.Tensor)
               else type(class_weights).__name__)
        raise ValueError(f"class_weights must be a floating-point tensor of shape [{vocab}] (one weight per class), "
                         f"got {got}")
    if tuple(class_weights.shape) != (vocab,):
        raise ValueError(f"class_weights must have shape [{vocab}] (one weight per class of the vocabulary), got "
                         f"{list(class_weights.shape)}")
    if device is not None and class_weights.device != device:
        raise ValueError(f"class_weights must be on {device} (the logits' device), got {class_weights.device}")
    # Read where it costs no device sync (the loss keeps none: on a GPU a NaN weight shows as a NaN loss) and outside
    # a compiled graph (where it would be a data-dependent branch).
    on_host = class_weights.device.type == "cpu" and not torch.compiler.is_compiling()
    if on_host and not bool(torch.isfinite(class_weights).all()):
        raise ValueError("class_weights must be finite; found NaN or inf")


class ClassWeightedRows:
    """A call's rows weighed by their labels' classes. The kernel runs with `kernel_options` (the plain CE) and
    `denominator` as num_items_in_batch; the reductions with the call's own options. Then, chunk by chunk: `observe`
    the rows' logits before the kernel overwrites them, `of_chunk` weighs the kernel's parts in place and returns
    the factors its gradient takes, `add_to_gradient_` adds the rest of the gradient. The parts are weighed here, so
    the reductions must not weigh them again (`tensor` is None)."""

    tensor = None

    def __init__(self, class_weights: torch.Tensor, labels: torch.Tensor, opts: LossOptions, num_items_in_batch):
        self.weights = class_weights.detach().to(torch.float32)
        self.vocab = self.weights.shape[0]
        self.smoothing, self.z_weight = float(opts.label_smoothing), float(opts.z_loss_weight)
        self.kept = labels != opts.ignore_index
        # Out-of-range labels are the kernels' to report (a NaN row, or an error): here they only must not index.
        self.labels = torch.where(self.kept, labels, 0).clamp(0, self.vocab - 1)
        self.label_weights = torch.where(self.kept, self.weights[self.labels], 0.0)
        # eps W / V: the factor's uniform share, and the smoothing's weight at the label.
        self.uniform = self.weights.sum() * (self.smoothing / self.vocab)
        self.factors = self.label_weights * (1.0 - self.smoothing) + self.kept * self.uniform
        self.kernel_options = dataclasses.replace(opts, label_smoothing=0.0, z_loss_weight=0.0)
        self.denominator, self.unweighted_share = self._denominators(opts, num_items_in_batch)
        wanted = self.smoothing != 0.0 or self.z_weight != 0.0
        self.at_label = torch.zeros_like(self.factors) if wanted else None  # x_y, for lse and the linear term
        self.linear_terms = torch.zeros_like(self.factors) if self.smoothing else None
        self.lse_factors = torch.zeros_like(self.factors) if self.z_weight else None  # b per row
        self.upstream = None  # reduction="none": each row's grad_output, in the backward's pass (`for_upstream`)

    def for_upstream(self, grad_output: torch.Tensor) -> ClassWeightedRows:
        """These rows for a per-row loss's backward, which runs the chunks again: every share of a row's gradient
        times the row's grad_output [N]."""
        rerun = copy.copy(self)
        rerun.upstream = grad_output
        return rerun

    def _denominators(self, opts: LossOptions, num_items_in_batch):
        """What "mean" divides by (num_items_in_batch where given, else the kept rows' label weights, 1 when they sum
        to 0 so that the loss is a differentiable 0 rather than NaN), and D / n: the factor that turns a part summed
        over D into its mean over the kept rows (the z-loss, the entropy). Device scalars: no host sync."""
        one = torch.ones((), dtype=torch.float32, device=self.weights.device)
        if opts.reduction != "mean" or num_items_in_batch is not None:
            return num_items_in_batch, one
        total = self.label_weights.sum()
        total = torch.where(total != 0, total, one)
        return total, total / self.kept.sum().clamp(min=1)

    def observe(self, rows: slice, logits: torch.Tensor) -> None:
        """The rows' logits [n, >= V] at their labels and the smoothing's linear term eps / V (W x_y - w . x)."""
        if self.at_label is None:
            return
        logits = logits[:, :self.vocab]
        at_label = logits.gather(1, self.labels[rows, None])[:, 0].float()
        self.at_label[rows] = at_label
        if self.linear_terms is None:
            return
        weighted = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        step = max(1, DOT_SLICE_BYTES // (4 * self.vocab))
        for start in range(0, logits.shape[0], step):
            weighted[start:start + step] = logits[start:start + step].float() @ self.weights
        term = (at_label * self.weights.sum() - weighted) * (self.smoothing / self.vocab)
        self.linear_terms[rows] = torch.where(self.kept[rows], term, 0.0)

    def of_chunk(self, rows: slice, parts: torch.Tensor) -> torch.Tensor:
        """Weighs the rows' parts in place (the CE times its factor plus the linear term; the z-loss, lse^2, and the
        entropy as means over the kept rows) and returns the factors the rows' gradient takes."""
        factors, kept = self.factors[rows], self.kept[rows]
        if self.z_weight:
            lse = parts[:, PART_CE] + self.at_label[rows]
            parts[:, PART_Z] = torch.where(kept, lse * lse, 0.0) * self.unweighted_share
            self.lse_factors[rows] = torch.where(kept, lse, 0.0) * (2.0 * self.z_weight) * self.unweighted_share
            factors = factors + self.lse_factors[rows]
        parts[:, PART_CE] *= self.factors[rows]
        if self.linear_terms is not None:
            parts[:, PART_CE] += self.linear_terms[rows]
        parts[:, PART_ENTROPY] *= self.unweighted_share
        return factors if self.upstream is None else factors * self.upstream[rows]

    def add_to_gradient_(self, rows: slice, grad: torch.Tensor, scale: torch.Tensor) -> None:
        """grad [n, >= V] (the kernel's times the factors) += scale ((eps W / V + b) onehot_y - eps / V w) on the
        kept rows."""
        if self.at_label is None:
            return
        grad = grad[:, :self.vocab]
        kept = self.kept[rows].to(torch.float32) * scale
        if self.upstream is not None:
            kept = kept * self.upstream[rows]
        at_label = kept * self.uniform
        if self.lse_factors is not None:
            at_label = at_label + self.lse_factors[rows] * (scale if self.upstream is None else
                                                            scale * self.upstream[rows])
        grad.scatter_add_(1, self.labels[rows, None], at_label.to(grad.dtype)[:, None])
        if self.linear_terms is not None:
            grad.addr_((kept * -(self.smoothing / self.vocab)).to(grad.dtype), self.weights.to(grad.dtype))
