"""The self-distillation loss of TRL's SDFT and SDPO trainers (trl.experimental.sdft / sdpo) for `bench_trl.py`: TRL's
loss as its trainers compute it against the loss of kdfast's subclasses (kdfast.integrations.trl_self_distillation),
on the same hidden states and heads.

TRL's trainers take both models' logits of the completion from their forwards (the student's with a gradient),
divide them by the temperature and call their loss helpers (`compute_topk_self_distillation_loss`,
`compute_full_logit_self_distillation_loss`, `compute_sampled_token_self_distillation_loss`); each sequence's mean
over its tokens is the loss (the benchmark's rows: one sequence). Here the logits are the heads' products of the
hidden states, as the models' forwards make them. kdfast's subclasses call `self_distillation_rows` on the hidden
states and heads, as their `_distillation` does. The modes timed: SDFT's default (the student's top-100 tokens,
renormalised, JSD 0.5), the full vocabulary (JSD 0.5) and SDPO's default (the sampled token's reverse KL).
"""

from __future__ import annotations

import warnings

import torch
from bench_trl_async import importable
from bench_trl_server import head_gradient_calls

# option value -> (task name, TRL's loss-helper settings), in the table's order.
MODES = {"top-k": ("SDFT default: top-100, renormalised, alpha=0.5", dict(mode="topk_logits", alpha=0.5, topk=100)),
         "full": ("full vocabulary, alpha=0.5", dict(mode="full_logits", alpha=0.5, topk=None)),
         "sampled": ("SDPO default: sampled token, alpha=1", dict(mode="sampled_token", alpha=1.0, topk=None))}


def _modules():
    """TRL's loss helpers and kdfast's per-token objective (ImportError without either)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL warns that its experimental namespace may change
        from trl.experimental.sdft import loss_utils

        from kdfast.integrations import self_distillation
    return loss_utils, self_distillation


def self_distillation_available() -> bool:
    return importable(_modules)


def self_distillation_contenders(inputs, mode: dict, args) -> dict:
    """method -> zero-argument callable giving (loss, None, d hidden, d weight): the self-distillation loss in
    `mode` by TRL's helpers on the logits and by kdfast on the hidden states and heads."""
    loss_utils, self_distillation = _modules()
    from kdfast.top_k_support import HeadMap

    hs, ws = inputs["student_hidden"], inputs["student_weight"]
    ht, wt, tokens = inputs["teacher_hidden"], inputs["teacher_weight"], inputs["labels"]
    temperature = args.temperature

    def trl_loss(h, w):
        student = (h @ w.t())[None] / temperature  # its forward's logits of one sequence, [1, N, V]
        with torch.no_grad():
            teacher = (ht @ wt.t())[None] / temperature
        if mode["mode"] == "topk_logits":
            per_token = loss_utils.compute_topk_self_distillation_loss(
                student, teacher, distillation_topk=mode["topk"], distillation_alpha=mode["alpha"],
                distillation_add_tail=False)
        elif mode["mode"] == "full_logits":
            per_token = loss_utils.compute_full_logit_self_distillation_loss(student, teacher,
                                                                             distillation_alpha=mode["alpha"])
        else:
            per_token = loss_utils.compute_sampled_token_self_distillation_loss(
                student, teacher, tokens[None], distillation_alpha=mode["alpha"])
        return per_token.mean()

    settings = self_distillation.SelfDistillationSettings(mode["mode"], mode["alpha"], mode["topk"], False, None,
                                                          temperature)
    row_weights = torch.full((hs.shape[0],), 1.0 / hs.shape[0], device=hs.device)

    def kdfast_loss(h, w):
        loss, _ = self_distillation.self_distillation_rows(h, HeadMap(w, temperature=temperature), ht,
                                                           HeadMap(wt, temperature=temperature), tokens, row_weights,
                                                           settings)
        return loss

    return head_gradient_calls(hs, ws, {"TRL": trl_loss, "kdfast": kdfast_loss})
