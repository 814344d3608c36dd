"""The reductions, shared by every autograd Function: the factor the summed loss (and so the gradient) takes,
computed on the device (no host sync), the loss formed from the kernels' per-row parts, and those parts reduced
for logging (`return_components=True`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from kdfast.kernel_abi import PART_CE, PART_COLUMNS, PART_CORRECT, PART_ENTROPY, PART_KD, PART_Z
from kdfast.options import LossOptions

# GOLD's hybrid (kdfast.cross_vocab) appends two columns to its parts: the matched divergence and the unmatched
# sorted L1, each before its weight. No kernel writes them; the reductions below carry them when present.
PART_MATCHED, PART_UNMATCHED = PART_COLUMNS, PART_COLUMNS + 1
PART_SPLIT_COLUMNS = PART_COLUMNS + 2


@dataclass(frozen=True)
class LossComponents:
    """The parts of a returned loss, detached, for logging. `kd`: the divergence before kd_weight and T^2; `ce`: the
    cross-entropy before ce_weight (label smoothing included); `z_loss`: log(Z)^2 of the student at T = 1 before
    z_loss_weight; each reduced as the loss is (None when its weight is 0: not computed). `accuracy`: the share of
    the kept rows whose largest student logit is the label's (a tie counts as a hit), or per row 1.0 / 0.0 with
    reduction="none"; None without labels. `entropy`: the student's entropy -sum_j q_j log q_j, q = softmax(student
    logits / T), as TRL logs it; with kd_weight=0 (a CE-only loss) that of softmax(student logits) at T = 1, the CE's
    distribution. Reduced as the loss is: "mean" sums the kept rows' and divides as the loss does (by the kept rows
    or num_items_in_batch), "sum" sums, "none" gives it per row (0 for an ignored row); None when the loss has
    neither a divergence nor a CE term. `teachers`: with several teachers (`multi_teacher_distill_loss`), each one's
    own divergence reduced as the loss ([M], or [..., M] for reduction="none"); None otherwise. `matched` and
    `unmatched`: for `cross_vocab_distill_loss` (and its linear form) with method="hybrid", GOLD's two parts before
    their weights, matched_weight * matched + unmatched_weight * unmatched = kd: the divergence over the tokens both
    vocabularies hold and the sorted L1 over the rest (0 where either side has no rest), reduced as the loss is (0
    for an ignored row with "none"); None for other methods and losses, and when kd_weight is 0. With
    return_components="per_row" every field is per row, as with reduction="none", whatever the loss's reduction.
    The fields from `entropy` on have defaults, so that positional construction keeps working."""

    kd: torch.Tensor | None
    ce: torch.Tensor | None
    z_loss: torch.Tensor | None
    accuracy: torch.Tensor | None
    entropy: torch.Tensor | None = None
    teachers: torch.Tensor | None = None
    matched: torch.Tensor | None = None
    unmatched: torch.Tensor | None = None


def reduction_scale(labels, rows: int, opts: LossOptions, num_items_in_batch, device) -> torch.Tensor:
    """1 for "sum" and "none"; for "mean", 1 / num_items_in_batch, else 1 / kept rows (at least 1: never NaN)."""
    if opts.reduction != "mean":
        return torch.ones((), dtype=torch.float32, device=device)
    # Numbers from the host become device scalars by a fill, never a copy: a copy from host memory is not allowed
    # while a CUDA graph is being captured.
    if isinstance(num_items_in_batch, torch.Tensor):
        denominator = num_items_in_batch.to(device=device, dtype=torch.float32).reshape(())
    elif num_items_in_batch is not None:
        denominator = torch.full((), float(num_items_in_batch), dtype=torch.float32, device=device)
    elif labels is not None:
        denominator = (labels != opts.ignore_index).sum().clamp(min=1).to(torch.float32)
    else:
        denominator = torch.full((), float(max(rows, 1)), dtype=torch.float32, device=device)
    return 1.0 / denominator


def reduced(parts: torch.Tensor, lead_shape, opts: LossOptions, scale: torch.Tensor,
            row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The returned loss from the kernels' parts [rows, PART_COLUMNS]: kd_scale * divergence + ce_weight * CE per row
    (a NaN part, from a label out of range, poisons its row whatever the weights), shaped like the labels ("none"),
    summed, or summed times the scale; each row times its weight first where `row_weights` [rows] are given."""
    if opts.reduction == "none":
        return weighted_total(parts, opts).view(lead_shape)
    if row_weights is not None:
        parts = weighted_rows(parts, row_weights)
    total = weighted_total(parts.sum(0), opts)
    return total * scale if opts.reduction == "mean" else total


def weighted_rows(parts: torch.Tensor, row_weights: torch.Tensor) -> torch.Tensor:
    """Each row's parts times its weight, but for the accuracy, which stays a count of hits."""
    weighted = parts * row_weights.reshape(-1, 1).to(parts.dtype)
    weighted[:, PART_CORRECT] = parts[:, PART_CORRECT]
    return weighted


def weighted_total(parts: torch.Tensor, opts: LossOptions) -> torch.Tensor:
    total = parts[..., PART_CE].mul(opts.ce_weight).add_(parts[..., PART_KD], alpha=opts.kd_scale)
    return total.add_(parts[..., PART_Z], alpha=opts.z_loss_weight) if opts.z_loss_weight != 0.0 else total


def component_summary(parts: torch.Tensor, lead_shape, labels, opts: LossOptions, scale: torch.Tensor,
                      row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The parts reduced one by one, as a tensor (an autograd Function's second output): [PART_COLUMNS] (the
    divergence, the CE, the z-loss and the entropy reduced as the loss, each row times its weight where
    `row_weights` are given; the accuracy over the kept rows; the hybrid's matched and unmatched parts after them,
    reduced as the loss, when `parts` has those columns), or [*lead_shape, columns] per row for reduction="none" or
    return_components="per_row" (before any scale or row weight)."""
    parts = parts.detach()
    if opts.components_per_row:
        return parts.view(*lead_shape, parts.shape[-1])
    sums = (weighted_rows(parts, row_weights) if row_weights is not None else parts).sum(0)
    factor = scale if opts.reduction == "mean" else torch.ones_like(scale)
    kept = (labels != opts.ignore_index).sum() if labels is not None else torch.zeros((), device=parts.device)
    split = [sums[PART_MATCHED] * factor, sums[PART_UNMATCHED] * factor] if parts.shape[-1] > PART_COLUMNS else []
    return torch.stack([sums[PART_KD] * factor, sums[PART_CE] * factor, sums[PART_Z] * factor,
                        sums[PART_CORRECT] / kept.clamp(min=1).to(sums.dtype), sums[PART_ENTROPY] * factor, *split])


def loss_components(summary: torch.Tensor, opts: LossOptions, has_labels: bool) -> LossComponents:
    """component_summary's tensor as the record users get."""
    split = opts.has_kd and summary.shape[-1] > PART_COLUMNS
    return LossComponents(summary[..., PART_KD] if opts.has_kd else None,
                          summary[..., PART_CE] if opts.ce_weight != 0.0 else None,
                          summary[..., PART_Z] if opts.z_loss_weight != 0.0 else None,
                          summary[..., PART_CORRECT] if has_labels else None,
                          summary[..., PART_ENTROPY] if opts.has_kd or opts.needs_labels else None,
                          matched=summary[..., PART_MATCHED] if split else None,
                          unmatched=summary[..., PART_UNMATCHED] if split else None)


def returned(outputs, opts: LossOptions, labels):
    """What the public functions return: the loss, or with return_components (loss, LossComponents)."""
    if not opts.return_components:
        return outputs
    loss, summary = outputs
    return loss, loss_components(summary, opts, labels is not None)


def returned_with_teachers(outputs, opts: LossOptions, labels):
    """`returned` for several teachers: with return_components, (loss, LossComponents whose `teachers` is each
    teacher's own divergence) from the Function's (loss, summary, per-teacher summary)."""
    if not opts.return_components:
        return outputs
    loss, summary, per_teacher = outputs
    return loss, dataclasses.replace(loss_components(summary, opts, labels is not None), teachers=per_teacher)


def reduced_outputs(ctx, parts, lead_shape, labels, opts: LossOptions, scale, row_weights=None):
    """A Function's outputs from the kernels' parts: the loss, and with return_components the summary of its parts
    (kdfast.reduction.component_summary), which has no gradient. `row_weights` [rows]: each row's weight in both."""
    loss = reduced(parts, lead_shape, opts, scale, row_weights)
    if not opts.return_components:
        return loss
    summary = component_summary(parts, lead_shape, labels, opts, scale, row_weights)
    ctx.mark_non_differentiable(summary)
    return loss, summary


def reduced_with_teachers(ctx, parts, per_teacher, lead_shape, labels, opts: LossOptions, scale):
    """`reduced_outputs`, and with return_components each teacher's divergence (`with_teacher_summary`)."""
    outputs = reduced_outputs(ctx, parts, lead_shape, labels, opts, scale)
    if not opts.return_components:
        return outputs
    return with_teacher_summary(ctx, outputs, per_teacher, lead_shape, opts, scale)


def with_teacher_summary(ctx, outputs, per_teacher: torch.Tensor, lead_shape, opts: LossOptions, scale) -> tuple:
    """A several-teacher Function's outputs: `reduced_outputs`' (loss, summary) and each teacher's divergence reduced
    as the loss ([M] for "mean" and "sum", [..., M] for "none" or return_components="per_row"), both summaries
    marked without a gradient in one call (a second mark_non_differentiable replaces the first)."""
    if opts.components_per_row:
        teachers = per_teacher.view(*lead_shape, per_teacher.shape[-1])
    else:
        teachers = per_teacher.sum(0)
        teachers = teachers * scale if opts.reduction == "mean" else teachers
    ctx.mark_non_differentiable(outputs[1], teachers)
    return (*outputs, teachers)

