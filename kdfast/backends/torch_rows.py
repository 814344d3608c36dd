"""What the torch backends (a dense teacher's and a sparse one's) share around their divergence: the label's column
in a chunk of rows, the CE family's gradient (kdfast.divergences.ce_coefficients), the student's entropy, and each
phase's outputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdfast import divergences
from kdfast.kernel_abi import Phase, PhaseCall
from kdfast.options import LossOptions


@dataclass
class LabelColumns:
    """A chunk's labels in this call's columns: held (in range), their safe column, the label's logit (0 where not
    held), and label smoothing's sum_j (s_j - reference) (None without smoothing or where it is not needed)."""

    held: torch.Tensor | None
    column: torch.Tensor | None
    logit: torch.Tensor | None
    shifted_sum: torch.Tensor | None
    global_vocab: int


def label_columns(s, labels, ref_c, opts: LossOptions, call: PhaseCall, zeros) -> LabelColumns:
    vocab = s.shape[1]
    held = column = logit = None
    if labels is not None:
        local = labels - call.col_offset
        held = (local >= 0) & (local < vocab)
        column = torch.where(held, local, torch.zeros_like(local))
        logit = torch.where(held, s.gather(-1, column[:, None]).squeeze(-1), zeros)
    smoothing = opts.has_ce and opts.label_smoothing != 0.0 and call.phase in (Phase.FUSED, Phase.SUMS)
    # (the reference is 0 on a shard's later phases)
    shifted_sum = (s - ref_c).sum(-1) if smoothing else None
    return LabelColumns(held, column, logit, shifted_sum, call.global_vocab or vocab)


def add_ce_gradient(grad, s, ref_c, log_z_c, labels: LabelColumns, opts: LossOptions) -> None:
    """grad += soft * softmax(s) - label * onehot - uniform (before the reduction's scale)."""
    soft, label, uniform = divergences.ce_coefficients(opts, 1.0, (ref_c + log_z_c)[:, 0], labels.global_vocab)
    grad += soft[:, None] * ((s - ref_c) - log_z_c).exp() - uniform
    if labels.held is not None:
        grad.scatter_add_(-1, labels.column[:, None], -label * labels.held.to(grad.dtype)[:, None])


def entropy_q_log_q(s, tempered_log_q, ref_c, log_z_c, opts: LossOptions):
    """sum_j q_j log q_j [R] over these columns for the entropy the parts log: q the student's softmax at T
    (`tempered_log_q`, its log-probabilities) with a divergence, else at T = 1 from the CE's statistics (a CE-only
    call); None with neither."""
    if opts.has_kd:
        return divergences.q_log_q(tempered_log_q)
    if opts.has_ce:
        return divergences.q_log_q((s - ref_c) - log_z_c)
    return None


def phase_outputs(kd, row_sum, labels: LabelColumns, ref_c, log_z_c, keep, grad, opts: LossOptions,
                  call: PhaseCall, zeros, q_log_q=None):
    """(FUSED: the rows' parts; SUMS: [divergence terms, D, the CE target's logit, sum q log q]; GRADIENT: None) and
    the gradient, with ignored rows zeroed. `q_log_q`: entropy_q_log_q's row sums (None: 0)."""
    if call.phase == Phase.FUSED:
        entropy = -q_log_q if q_log_q is not None else None
        out = divergences.fused_parts(kd, labels.logit, labels.held, ref_c[:, 0], log_z_c[:, 0], opts, zeros,
                                      labels.shifted_sum, labels.global_vocab, entropy)
        if opts.needs_labels and grad is not None:
            grad.masked_fill_(~labels.held[:, None], 0.0)
    elif call.phase == Phase.SUMS:  # (no CE: no target, whatever label_smoothing says)
        target = divergences.ce_target_logit(opts, labels.logit if labels.logit is not None else zeros,
                                             labels.shifted_sum, labels.global_vocab) if opts.has_ce else zeros
        out = torch.stack([kd if kd is not None else zeros, row_sum if row_sum is not None else zeros, target,
                           q_log_q if q_log_q is not None else zeros], dim=-1)
    else:
        out = None
    if keep is not None:
        if out is not None:
            out = torch.where(keep.view(-1, *([1] * (out.dim() - 1))), out, torch.zeros_like(out))
        if grad is not None:
            grad.masked_fill_(~keep[:, None], 0.0)  # a fill, not a product: NaN in an ignored row stays out
    return out, grad
