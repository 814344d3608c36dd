"""The per-token objectives of TRL's self-distillation trainers (SDFT and SDPO, `trl.experimental`), computed from the
two models' hidden states and heads by kdfast's fused kernels instead of from [B, T, V] logits. A teacher conditioned
on privileged context (the student itself, its base weights or an EMA copy) and the student are compared over the
completion tokens, each token's loss weighted and summed:

- "full_logits": TRL's generalized JSD with `alpha` (0 forward KL, 1 reverse KL) between the two softmaxes at T:
  `fused_linear_loss` with the weights as its row weights (the gradient final in the forward, four GEMMs);
- "topk_logits": the same divergence over the student's own top-k tokens, renormalised over them, or with one tail
  bucket each for the rest (`add_tail`): a GEMM per chunk of each head without a gradient finds the ids and the
  logits there (`kdfast.top_k_support`); renormalised, the student's gradient goes through its K head rows alone;
  with the tail it is `fused_linear_sparse_loss`'s bucket divergence;
- "sampled_token": the reverse-KL estimator on the realised tokens, (log q - log p).detach() * log q, in one pass
  over the student's head (`kdfast.sampled_token_loss`: each token's weight formed from its log q as the chunk's
  kernel computes it, the gradient final in the forward), the teacher's log p from `linear_token_logprobs`.

Every mode takes TRL's clipped importance ratio exp(log q - log q_old) (at most `is_clip`, detached) where the
rollout's log-probs are given. A teacher behind a vLLM server (`served_self_distillation_rows`) gives its top-k ids and
log-probs and the realised token's: "topk_logits" is then over the teacher's ids, "sampled_token" the same estimator."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdfast.integrations.support_divergence import check_served_mass, divergence_over_support
from kdfast.linear_loss import fused_linear_loss
from kdfast.options import LossOptions
from kdfast.sampled_token_loss import clipped_ratio, linear_sampled_token_loss
from kdfast.token_logprobs import linear_token_logprobs
from kdfast.top_k_support import HeadMap, logits_at, top_k_support

MODES = ("full_logits", "topk_logits", "sampled_token")


@dataclass(frozen=True)
class SelfDistillationSettings:
    """TRL's SDFTConfig / SDPOConfig loss fields: `distillation_mode`, `distillation_alpha`, `distillation_topk`,
    `distillation_add_tail`, `distillation_is_clip` and the trainer's `temperature`."""

    mode: str
    alpha: float
    topk: int | None
    add_tail: bool
    is_clip: float | None
    temperature: float

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"distillation_mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "topk_logits" and self.topk is None:
            raise ValueError("distillation_mode='topk_logits' requires distillation_topk to be set")
        if self.mode == "sampled_token" and self.alpha != 1.0:
            raise ValueError(f"distillation_mode='sampled_token' is reverse KL only: distillation_alpha must be 1.0, "
                             f"got {self.alpha}")


def self_distillation_rows(student_hidden: torch.Tensor, student: HeadMap, teacher_hidden: torch.Tensor,
                           teacher: HeadMap, token_ids: torch.Tensor, row_weights: torch.Tensor,
                           settings: SelfDistillationSettings, old_logprobs: torch.Tensor | None = None):
    """The kept completion tokens' objective: hidden states [n, H_s] / [n, H_t], the heads (their temperature
    `settings.temperature`), the realised tokens [n], each token's weight [n] (TRL's per-sequence normalisation).
    Returns (sum_r weight_r * ratio_r * loss_r, with its gradient to the student; sum_r ratio_r * loss_r, detached,
    for TRL's logged mean), ratio_r the clipped importance ratio where `old_logprobs` [n] and `is_clip` are given,
    else 1."""
    clipping = settings.is_clip is not None and old_logprobs is not None
    teacher_hidden = teacher_hidden.detach()
    if settings.mode == "sampled_token":
        return _sampled_token(student_hidden, student, teacher_hidden, teacher, token_ids, row_weights, settings,
                              old_logprobs if clipping else None)
    if settings.mode == "topk_logits":
        return _top_k(student_hidden, student, teacher_hidden, teacher, token_ids, row_weights, settings,
                      old_logprobs if clipping else None)
    ratio = None
    if clipping:
        with torch.no_grad():
            token_logprobs = linear_token_logprobs(student_hidden, student.weight, token_ids, bias=student.bias,
                                                   temperature=settings.temperature, logit_scale=student.scale,
                                                   softcap=student.softcap)
        ratio = clipped_ratio(token_logprobs, old_logprobs, settings.is_clip)
    options = LossOptions(divergence="jsd", beta=settings.alpha, temperature=settings.temperature, t2_scale=False,
                          reduction="sum", return_components="per_row")
    weights = row_weights if ratio is None else row_weights * ratio
    loss, parts = fused_linear_loss(student_hidden, student.weight, teacher_hidden, teacher.weight, None, options,
                                    student_bias=student.bias, teacher_bias=_detached(teacher.bias),
                                    student_softcap=student.softcap, teacher_softcap=teacher.softcap,
                                    student_logit_scale=student.scale, teacher_logit_scale=teacher.scale,
                                    row_weights=weights)
    return loss, _metric_sum(parts.kd, ratio)


def _top_k(student_hidden, student: HeadMap, teacher_hidden, teacher: HeadMap, token_ids, row_weights, settings,
           old_logprobs):
    """Over the student's top-k ids: renormalised (TRL's default) or with a tail bucket on each side."""
    ids, values, _, token_logprobs = top_k_support(student_hidden.detach(), student, settings.topk,
                                                   token_ids if old_logprobs is not None else None)
    # The teacher's log-sum-exp only for the tail: renormalised, it cancels.
    teacher_values, teacher_lse, _ = logits_at(teacher_hidden, teacher, ids, with_lse=settings.add_tail)
    ratio = clipped_ratio(token_logprobs, old_logprobs, settings.is_clip) if old_logprobs is not None else None
    weights = row_weights if ratio is None else row_weights * ratio
    # With the tail the teacher's log-probs at T over the student's ids; renormalised its logits do as well.
    teacher_rows = teacher_values - teacher_lse[:, None] if settings.add_tail else teacher_values
    loss, per_token = divergence_over_support(student_hidden, student, ids, values, teacher_rows, weights,
                                              beta=settings.alpha, add_tail=settings.add_tail)
    return loss, _metric_sum(per_token, ratio)


@dataclass(frozen=True)
class ServedTeacher:
    """What a teacher behind a vLLM server returns for the kept tokens (TRL's `_get_teacher_token_logprobs_from_server`
    at the trainer's temperature): its top-k ids [n, K] and log-probs [n, K], and the realised token's log-prob
    [n]."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    token_logprobs: torch.Tensor


def served_self_distillation_rows(student_hidden: torch.Tensor, student: HeadMap, served: ServedTeacher,
                                  token_ids: torch.Tensor, row_weights: torch.Tensor,
                                  settings: SelfDistillationSettings, old_logprobs: torch.Tensor | None = None):
    """`self_distillation_rows` against a served teacher: "sampled_token" against its token log-probs, "topk_logits"
    over its own top-k ids (the server cannot score the student's). Returns the loss, the metric's sum, and the
    student's log q(token) at T [n], detached (TRL logs its distance from the teacher's)."""
    if settings.mode == "full_logits":
        raise ValueError("a served teacher returns top-k log-probs, not its whole distribution: "
                         "distillation_mode='full_logits' needs a local teacher")
    clipping = settings.is_clip is not None and old_logprobs is not None
    if settings.mode == "sampled_token":
        return _sampled_token_loss(student_hidden, student, served.token_logprobs, token_ids, row_weights, settings,
                                   old_logprobs if clipping else None)
    # One pass over the student's head for its logits at the teacher's ids and its log q(token) (the ratio and
    # TRL's logged distance from the server's need the latter in every mode).
    values, _, token_logprobs = logits_at(student_hidden.detach(), student, served.ids, token_ids)
    ratio = clipped_ratio(token_logprobs, old_logprobs, settings.is_clip) if clipping else None
    weights = row_weights if ratio is None else row_weights * ratio
    if settings.add_tail:
        check_served_mass(served.logprobs, "distillation_add_tail")
    loss, per_token = divergence_over_support(student_hidden, student, served.ids, values, served.logprobs.float(),
                                              weights, beta=settings.alpha, add_tail=settings.add_tail)
    return loss, _metric_sum(per_token, ratio), token_logprobs


def _sampled_token(student_hidden, student: HeadMap, teacher_hidden, teacher: HeadMap, token_ids, row_weights,
                   settings, old_logprobs):
    """TRL's sampled-token reverse KL: the gradient of (log q - log p).detach() * log q, q and p at T."""
    with torch.no_grad():
        teacher_logprobs = linear_token_logprobs(teacher_hidden, teacher.weight, token_ids, bias=teacher.bias,
                                                 temperature=settings.temperature, logit_scale=teacher.scale,
                                                 softcap=teacher.softcap)
    loss, metric_sum, _ = _sampled_token_loss(student_hidden, student, teacher_logprobs, token_ids, row_weights,
                                              settings, old_logprobs)
    return loss, metric_sum


def _sampled_token_loss(student_hidden, student: HeadMap, teacher_logprobs, token_ids, row_weights, settings,
                        old_logprobs):
    """The estimator in one pass over the student's head, each token's weight formed from its own log q as the
    chunk's kernel computes it (`kdfast.sampled_token_loss`). Returns the loss, the metric's sum and log q."""
    loss, logprobs, ratio = linear_sampled_token_loss(
        student_hidden, student.weight, token_ids, teacher_logprobs, row_weights, bias=student.bias,
        temperature=settings.temperature, logit_scale=student.scale, softcap=student.softcap, clip=settings.is_clip,
        old_logprobs=old_logprobs)
    return loss, _metric_sum((logprobs - teacher_logprobs.float()) * logprobs, ratio), logprobs


def _metric_sum(per_token: torch.Tensor, ratio: torch.Tensor | None) -> torch.Tensor:
    per_token = per_token.detach().float()
    return (per_token if ratio is None else per_token * ratio).sum()


def _detached(tensor):
    return tensor.detach() if tensor is not None else None
