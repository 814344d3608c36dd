"""The losses of TRL's IW-OPD trainer (`trl.experimental.iw_opd.IWOPDTrainer`, TRL >= 1.16) over the kept completion
tokens, from the two models' hidden states and heads instead of their [B, T, V] logits:

- "iw_opd" (its default objective): importance-weighted on-policy distillation. Each sampled token's advantage
  a = log p(t) - log q_rollout(t) (the teacher's log-prob less the rollout's, detached) is weighted by
  1 + gamma * (1 - (the sequence's |a| before it) / (its total |a|)), and the loss is -sum_t w a log q(t): a
  cross-entropy with those row weights, one pass over the student's head (`linear_weighted_nll`): the weights known
  first where the rollout's log-probs are cached, else formed from each chunk's own log q, the chunks whole
  sequences. The teacher's log p(t) comes from `linear_token_logprobs`.
- "jsd" with `loss_top_k` 0: the generalized JSD with `beta` over the whole vocabulary (`fused_linear_loss`).
- "jsd" with `loss_top_k` K: over the teacher's top-K ids (beta 0), the student's (beta 1) or their union (the
  teacher's first, a repeated id dropped), each side renormalised over them or with a tail bucket (`loss_add_tail`);
  beta > 0 with K = 1: the teacher's top-1 and the sampled token (or the student's argmax), TRL's mixed top-1.
  The supports are found by a GEMM per chunk of each head without a gradient (`kdfast.top_k_support`), the
  divergence over them by `kdfast.integrations.support_divergence`.

A teacher behind a vLLM server gives its top-k and the sampled tokens' log-probs: the same objectives over those."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdfast.integrations.support_divergence import check_served_mass, divergence_over_support
from kdfast.kernel_abi import PART_CE
from kdfast.linear_chunks import CHUNK_BUDGET_BYTES
from kdfast.linear_loss import fused_linear_loss
from kdfast.options import LossOptions
from kdfast.sampled_token_loss import linear_weighted_nll
from kdfast.token_logprobs import linear_token_logprobs
from kdfast.top_k_support import HeadMap, logits_at, top_k_and_logits_at, top_k_support


@dataclass(frozen=True)
class IWOPDSettings:
    """IWOPDConfig's loss fields: `distillation_objective`, `beta`, `loss_top_k`, `loss_add_tail`,
    `reverse_kl_top_1_mode`, `iw_opd_gamma`, `iw_opd_epsilon` (the temperature is each HeadMap's)."""

    objective: str
    beta: float
    top_k: int
    add_tail: bool
    top_1_mode: str = "sampled"
    gamma: float = 0.5
    epsilon: float = 1e-8


def iw_opd_advantages(teacher_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, valid: torch.Tensor,
                      gamma: float, epsilon: float):
    """TRL's IW-OPD weighting over [B, T] completion tokens (`valid` marks the kept ones): a = log p - log q_rollout,
    w = 1 + gamma * (1 - prefix|a| / max(total|a|, epsilon)) per sequence. Returns (w * a, |a|, w), detached."""
    zero = torch.zeros((), dtype=torch.float32, device=valid.device)
    teacher = torch.where(valid, teacher_logprobs.float(), zero)
    rollout = torch.where(valid, rollout_logprobs.float(), zero)
    advantage = torch.where(valid, (teacher - rollout).detach(), zero)
    magnitude = advantage.abs()
    before = magnitude.cumsum(dim=1) - magnitude
    total = magnitude.sum(dim=1, keepdim=True).clamp_min(epsilon)
    weights = 1.0 + gamma * (1.0 - before / total)
    return weights * advantage, magnitude, weights


class KeptRows:
    """The completion tokens in the loss (labels not `ignore_index`, or where `valid` is true) of a [B, L] batch, as
    rows [n, ...] and back."""

    def __init__(self, labels: torch.Tensor | None = None, ignore_index: int = -100, *,
                 valid: torch.Tensor | None = None):
        self.valid = valid if valid is not None else labels != ignore_index
        self.index = self.valid.reshape(-1).nonzero().squeeze(1)
        self.count = int(self.index.shape[0])

    def of(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.reshape(-1, *tensor.shape[2:]).index_select(0, self.index)

    def scattered(self, values: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(self.valid.numel(), dtype=values.dtype, device=values.device)
        return full.index_put((self.index,), values).view(self.valid.shape)


def iw_opd_rows(student_hidden: torch.Tensor, student: HeadMap, token_ids: torch.Tensor,
                teacher_logprobs: torch.Tensor, rows: KeptRows, settings: IWOPDSettings, denominator,
                rollout_logprobs: torch.Tensor | None = None):
    """The IW-OPD loss -sum_r w_r a_r log q(t_r) / denominator over the kept rows (hidden [n, H], tokens [n], the
    teacher's log p(t) [n], the rollout's log q(t) [n], or None: the student's own). Returns (the loss, with its
    gradient to the student; (w a, |a|, w) over the [B, L] batch, for the metrics).

    A token's weight needs the log q of every token of its sequence. With the rollout's log-probs (vLLM's) they are
    known before the student's pass: one cross-entropy pass with the weights as row weights, the gradient final in
    the forward (three GEMMs of the head). Without, the pass's chunks are groups of whole sequences, and each chunk's
    weights are formed from its own log q before its gradient GEMMs (three GEMMs too, one call, one weight gradient);
    a sequence too long for a chunk (past `LONGEST_CHUNK_FACTOR` times the fused losses' chunk) takes
    `linear_token_logprobs` with its gradient, weighted after (four GEMMs)."""
    head = dict(bias=student.bias, temperature=student.temperature, logit_scale=student.scale,
                softcap=student.softcap)
    if rollout_logprobs is not None:
        advantages, magnitude, weights = _advantages(teacher_logprobs, rollout_logprobs, rows, settings)
        loss = linear_weighted_nll(student_hidden, student.weight, token_ids, rows.of(advantages) / denominator,
                                   **head)
        return loss, (advantages, magnitude, weights)
    groups = _sequence_groups(rows, student, student_hidden.device)
    if groups is None:
        logprobs = linear_token_logprobs(student_hidden, student.weight, token_ids, **head)
        advantages, magnitude, weights = _advantages(teacher_logprobs, logprobs.detach(), rows, settings)
        return -(rows.of(advantages) * logprobs).sum() / denominator, (advantages, magnitude, weights)
    weights = _SequenceChunkWeights(groups, teacher_logprobs, rows, settings, denominator)
    loss = linear_weighted_nll(student_hidden, student.weight, token_ids, weights, **head,
                               chunk_size=tuple(kept.stop - kept.start for _, kept in groups))
    return loss, weights.metrics


# A group of whole sequences is one chunk of the head's logits: at most this many times the rows of the fused losses'
# chunk (their memory budget, kdfast.linear_chunks.CHUNK_BUDGET_BYTES), so that a sequence of the usual completion
# lengths fits in one.
LONGEST_CHUNK_FACTOR = 4
MIN_GROUP_ROWS = 16


def _sequence_groups(rows: KeptRows, student: HeadMap, device):
    """[(the batch rows of a group of whole sequences, their kept rows)], each group within a chunk's budget of rows;
    None where one sequence alone is past the longest chunk."""
    per_row = student.weight.shape[0] * (8 if student.softcap is not None else 4)  # float32 logits (+ uncapped)
    budget = max(MIN_GROUP_ROWS, CHUNK_BUDGET_BYTES.get(device.type, CHUNK_BUDGET_BYTES["cpu"]) // per_row)
    lengths = rows.valid.sum(1).tolist()
    if max(lengths, default=0) > LONGEST_CHUNK_FACTOR * budget:
        return None
    budget = max(budget, max(lengths, default=0))
    groups, first, start, size = [], 0, 0, 0
    for sequence, length in enumerate(lengths):
        if size + length > budget and size > 0:
            groups.append((slice(first, sequence), slice(start, start + size)))
            first, start, size = sequence, start + size, 0
        size += length
    if size > 0:
        groups.append((slice(first, len(lengths)), slice(start, start + size)))
    return groups


class _SequenceChunkWeights:
    """IW-OPD's row weights w a / denominator, formed chunk by chunk from each chunk's own log q (its cross-entropy
    kernel's), each chunk a group of whole sequences. Keeps (w a, |a|, w) over the [B, L] batch for the metrics, and
    every row's weight as `tensor` (which the loss's reduction reads)."""

    def __init__(self, groups, teacher_logprobs, rows: KeptRows, settings: IWOPDSettings, denominator):
        self.groups = {kept.start: (sequences, kept, KeptRows(valid=rows.valid[sequences])) for sequences, kept in
                       groups}
        self.teacher_logprobs, self.settings, self.denominator = teacher_logprobs, settings, denominator
        self.tensor = torch.empty(rows.count, dtype=torch.float32, device=rows.valid.device)
        self.metrics = tuple(torch.zeros(rows.valid.shape, dtype=torch.float32, device=rows.valid.device)
                             for _ in range(3))

    def of_chunk(self, chunk: slice, parts: torch.Tensor) -> torch.Tensor:
        sequences, kept, group = self.groups[chunk.start]
        if parts.shape[0] != group.count:
            raise RuntimeError("an IW-OPD group of sequences must be one chunk of the head")
        for whole, part in zip(self.metrics, _advantages(self.teacher_logprobs[kept], -parts[:, PART_CE], group,
                                                         self.settings), strict=True):
            whole[sequences] = part
        self.tensor[kept] = group.of(self.metrics[0][sequences]) / self.denominator
        return self.tensor[kept]


def _advantages(teacher_logprobs, rollout_logprobs, rows: KeptRows, settings: IWOPDSettings):
    return iw_opd_advantages(rows.scattered(teacher_logprobs), rows.scattered(rollout_logprobs), rows.valid,
                             settings.gamma, settings.epsilon)


@torch.no_grad()
def token_logprobs(hidden: torch.Tensor, head: HeadMap, token_ids: torch.Tensor) -> torch.Tensor:
    """log q(t) at the head's temperature [n], without a gradient (the teacher's, or the student's own rollout's)."""
    return linear_token_logprobs(hidden, head.weight, token_ids, bias=head.bias, temperature=head.temperature,
                                 logit_scale=head.scale, softcap=head.softcap)


def local_divergence_sum(student_hidden: torch.Tensor, student: HeadMap, teacher_hidden: torch.Tensor,
                         teacher: HeadMap, token_ids: torch.Tensor, settings: IWOPDSettings) -> torch.Tensor:
    """The "jsd" objective summed over kept rows (hidden [n, H_s] / [n, H_t], sampled tokens [n]) against a local
    teacher, with its gradient to the student."""
    teacher_hidden = teacher_hidden.detach()
    vocab = student.weight.shape[0]
    if settings.top_k == 0 or settings.top_k >= vocab:  # TRL's full-vocabulary path (a support as large as V)
        options = LossOptions(divergence="jsd", beta=settings.beta, temperature=student.temperature,
                              t2_scale=False, reduction="sum")
        return fused_linear_loss(student_hidden, student.weight, teacher_hidden, teacher.weight, None, options,
                                 student_bias=student.bias, teacher_bias=_detached(teacher.bias),
                                 student_softcap=student.softcap, teacher_softcap=teacher.softcap,
                                 student_logit_scale=student.scale, teacher_logit_scale=teacher.scale)
    ids, student_values, teacher_rows = _local_support(student_hidden.detach(), student, teacher_hidden, teacher,
                                                       token_ids, settings)
    ones = torch.ones(ids.shape[0], dtype=torch.float32, device=ids.device)
    return divergence_over_support(student_hidden, student, ids, student_values, teacher_rows, ones,
                                   beta=settings.beta, add_tail=settings.add_tail)[0]


def _local_support(student_hidden, student: HeadMap, teacher_hidden, teacher: HeadMap, token_ids,
                   settings: IWOPDSettings):
    """(ids [n, S], -1 for an empty slot; the student's mapped logits there or None; the teacher's rows there:
    log-probs at T with the tail, else logits or log-probs, which renormalising makes one)."""
    k, beta, tail = settings.top_k, settings.beta, settings.add_tail
    if beta > 0 and k == 1:  # the mixed top-1: the teacher's argmax and the sampled token (or the student's argmax)
        reverse = token_ids if settings.top_1_mode == "sampled" else top_k_support(student_hidden, student, 1)[0][:, 0]
        top, values, lse, reverse_logprobs = top_k_support(teacher_hidden, teacher, 1, reverse)
        if beta == 1:
            return reverse[:, None], None, reverse_logprobs[:, None]
        second = torch.where(reverse == top[:, 0], torch.full_like(reverse, -1), reverse)
        return (torch.stack([top[:, 0], second], dim=1), None,
                torch.stack([values[:, 0] - lse, reverse_logprobs], dim=1))
    if beta == 0:  # the teacher's top-k
        ids, values, lse, _ = top_k_support(teacher_hidden, teacher, k, with_lse=tail)
        return ids, None, values - lse[:, None] if tail else values
    student_ids, student_values, _, _ = top_k_support(student_hidden, student, k)
    if beta == 1:  # the student's top-k
        values, lse, _ = logits_at(teacher_hidden, teacher, student_ids, with_lse=tail)
        return student_ids, student_values, values - lse[:, None] if tail else values
    # The union, TRL's order: the teacher's top-k, then the student's not among them.
    teacher_ids, teacher_top, teacher_at_student, lse = top_k_and_logits_at(teacher_hidden, teacher, k,
                                                                           student_ids, with_lse=tail)
    repeated = (student_ids[:, :, None] == teacher_ids[:, None, :]).any(-1)
    ids = torch.cat([teacher_ids, torch.where(repeated, torch.full_like(student_ids, -1), student_ids)], dim=1)
    teacher_rows = torch.cat([teacher_top, teacher_at_student], dim=1)
    if tail:
        return ids, None, teacher_rows - lse[:, None]
    student_at_teacher = logits_at(student_hidden, student, teacher_ids)[0]
    return ids, torch.cat([student_at_teacher, student_values], dim=1), teacher_rows


def served_divergence_sum(student_hidden: torch.Tensor, student: HeadMap, ids: torch.Tensor,
                          logprobs: torch.Tensor, settings: IWOPDSettings) -> torch.Tensor:
    """The "jsd" objective summed over kept rows against a served teacher's ids [n, S] (-1: none) and log-probs."""
    if settings.add_tail:
        check_served_mass(torch.where(ids >= 0, logprobs.float(), float("-inf")), "loss_add_tail")
    ones = torch.ones(ids.shape[0], dtype=torch.float32, device=ids.device)
    return divergence_over_support(student_hidden, student, ids, None, logprobs, ones, beta=settings.beta,
                                   add_tail=settings.add_tail)[0]


def _detached(tensor):
    return tensor.detach() if tensor is not None else None
