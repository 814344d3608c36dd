"""TRL's generalized JSD over a few token ids per row (a support: the teacher's top-k, the student's, their union, the
teacher's top-1 and the sampled token), from the student's hidden states and head: the sparse divergence its
self-distillation (SDFT, SDPO) and IW-OPD trainers compute from [B, T, V] logits. Each side is either renormalised
over the support (no gradient outside it: the full log-sum-exp cancels, so the student's gradient goes through the
support's head rows alone, `kdfast.top_k_support.LogitsAtIds`) or keeps one tail bucket for the rest of its mass
(`fused_linear_sparse_loss`'s bucket divergence, the student's full row in one chunk at a time). A slot whose id is
-1 is empty (a repeated id dropped from a union, a server's padding), on both sides."""

from __future__ import annotations

import torch

from kdfast.linear_sparse_loss import fused_linear_sparse_loss
from kdfast.loss import distill_loss
from kdfast.sparse_options import SparseOptions
from kdfast.top_k_support import HeadMap, logits_at, student_logits_at
from kdfast.validation import TEACHER_MASS_SLACK


def divergence_over_support(student_hidden: torch.Tensor, student: HeadMap, ids: torch.Tensor,
                            student_values: torch.Tensor | None, teacher_rows: torch.Tensor, weights: torch.Tensor,
                            *, beta: float, add_tail: bool):
    """JSD(beta) (0 forward KL, 1 reverse KL) over the ids [n, S] at the head's temperature: with the tail
    (`add_tail`), the teacher's S log-probs `teacher_rows` and its rest against the student's, one bucket each;
    renormalised, each side's softmax over its S values (the teacher's may be logits or log-probs: its full
    log-sum-exp cancels). `student_values`: the student's mapped logits at the ids where already known (renormalised
    only; else one pass over its head finds them). Returns (sum_r weights_r * loss_r with its gradient to the student;
    loss_r [n], detached)."""
    held = ids >= 0
    if add_tail:
        options = SparseOptions(divergence="jsd", beta=beta, temperature=student.temperature, t2_scale=False,
                                reduction="sum", return_components="per_row", tail="bucket")
        teacher_rows = torch.where(held, teacher_rows.float(), torch.zeros((), device=ids.device))
        loss, parts = fused_linear_sparse_loss(student_hidden, student.weight, ids, teacher_rows, None, options,
                                               student_bias=student.bias, softcap=student.softcap,
                                               logit_scale=student.scale, row_weights=weights)
        return loss, parts.kd
    safe_ids = ids.clamp_min(0)  # an empty slot reads column 0, then is emptied on both sides below
    if student_values is None:
        student_values = logits_at(student_hidden.detach(), student, safe_ids)[0]
    student_logits = student_logits_at(student_hidden, student, safe_ids, student_values)
    teacher_rows = teacher_rows.float()
    if not bool(held.all()):
        # -inf on both sides: kdfast's divergence gives such a column no loss and no gradient.
        student_logits = torch.where(held, student_logits, float("-inf"))
        teacher_rows = torch.where(held, teacher_rows, float("-inf"))
    per_token = distill_loss(student_logits, teacher_rows, divergence="jsd", beta=beta, t2_scale=False,
                             reduction="none")
    return (per_token * weights).sum(), per_token.detach()


def check_served_mass(logprobs: torch.Tensor, setting: str) -> None:
    """A served top-k's probabilities sum to at most 1 (up to 16-bit storage's slack) where its rest is a bucket:
    TRL floors a negative rest and trains on it; kdfast refuses it, naming the server and the trainer's `setting`."""
    mass = logprobs.float().exp().sum(-1)
    worst = float(mass.max()) if mass.numel() else 0.0
    if worst > 1.0 + TEACHER_MASS_SLACK:
        raise ValueError(f"the teacher server's top-{logprobs.shape[-1]} log-probs of a kept token sum to "
                         f"{worst:.4g} > 1 in probability: no distribution's, so its rest (the tail bucket, "
                         f"{setting}=True) would be negative; check what the server returns")
