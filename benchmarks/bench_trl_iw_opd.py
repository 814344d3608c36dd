"""The loss of TRL's IW-OPD trainer (trl.experimental.iw_opd) for `bench_trl.py`: TRL's loss as its trainer computes
it against the loss of kdfast's subclass (kdfast.integrations.trl_iw_opd), on the same hidden states and heads.

TRL's trainer takes both models' logits of the completion from their forwards (the student's with a gradient) and
calls its loss methods on them: `_compute_iw_opd_loss` (the teacher's log-softmax gathered at the sampled tokens
first), `_compute_local_sparse_top_1_divergence_loss` or `generalized_jsd_loss`. Here the logits are the heads'
products of the hidden states, as the models' forwards make them, and the rows completions of 512 tokens
(IWOPDConfig's `max_completion_length`; one sequence where they do not divide the rows). kdfast's subclass calls
`iw_opd_rows` / `local_divergence_sum` on the hidden states and heads, as its `_iw_opd` / `_divergence` do. The modes
timed: IWOPDConfig's default (the IW-OPD objective, the student's own log-probs as the rollout's; with vLLM's rollout
log-probs cached, as its vLLM generation returns them, with --full), the "jsd" objective at its defaults (beta 1,
loss_top_k 1: the sampled token and its tail bucket) and the generalized JSD over the whole vocabulary (beta 0.5)."""

from __future__ import annotations

import types
import warnings

import torch
from bench_trl_async import importable
from bench_trl_server import head_gradient_calls

COMPLETION_LENGTH = 512

# option value -> (task name, IWOPDConfig's loss fields), in the table's order.
MODES = {"iw-opd": ("IW-OPD default: sampled-token advantage, gamma=0.5",
                    dict(distillation_objective="iw_opd", beta=1.0, loss_top_k=1)),
         "iw-opd-rollout": ("IW-OPD, vLLM's rollout log-probs cached",
                            dict(distillation_objective="iw_opd", beta=1.0, loss_top_k=1, rollout=True)),
         "top-1": ("jsd default: beta=1, top-1 with tail", dict(distillation_objective="jsd", beta=1.0, loss_top_k=1)),
         "full": ("jsd, full vocabulary, beta=0.5", dict(distillation_objective="jsd", beta=0.5, loss_top_k=0))}


def _modules():
    """TRL's trainer class and kdfast's IW-OPD objectives (ImportError without either)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL warns that its experimental namespace may change
        from trl.experimental.iw_opd import IWOPDTrainer

        from kdfast.integrations import iw_opd
    return IWOPDTrainer, iw_opd


def iw_opd_available() -> bool:
    return importable(_modules)


def _trl_loss_methods(trainer_cls, mode: dict, temperature: float):
    """An IWOPDTrainer with only what its loss methods read: no model, no data, no teacher to load."""
    trainer = trainer_cls.__new__(trainer_cls)
    trainer.__dict__.update(temperature=temperature, iw_opd_gamma=0.5, iw_opd_epsilon=1e-8, beta=mode["beta"],
                            loss_top_k=mode["loss_top_k"], loss_add_tail=True, reverse_kl_top_1_mode="sampled",
                            model=types.SimpleNamespace(training=True), _metrics={"train": {}, "eval": {}})
    trainer._metrics["train"] = _Discarded()
    return trainer


class _Discarded(dict):
    """The trainer's metric lists, dropped: the benchmark times the loss."""

    def __missing__(self, key):
        return []


def iw_opd_contenders(inputs, mode: dict, args) -> dict:
    """method -> zero-argument callable giving (loss, None, d hidden, d weight): the IW-OPD trainer's loss in `mode`
    by TRL's methods on the logits and by kdfast on the hidden states and heads."""
    trainer_cls, iw_opd = _modules()
    from kdfast.top_k_support import HeadMap

    hs, ws = inputs["student_hidden"], inputs["student_weight"]
    ht, wt, tokens = inputs["teacher_hidden"], inputs["teacher_weight"], inputs["labels"]
    temperature = args.temperature
    trainer = _trl_loss_methods(trainer_cls, mode, temperature)
    # Completions of IWOPDConfig's max_completion_length (512) where the rows make whole ones, else one sequence.
    length = COMPLETION_LENGTH if tokens.shape[0] % COMPLETION_LENGTH == 0 else tokens.shape[0]
    labels = tokens.view(-1, length)
    rollout = None
    if mode.get("rollout"):  # as vLLM returns them with the completions: the sampling policy's log q(t)
        rollout = iw_opd.token_logprobs(hs, HeadMap(ws, temperature=temperature), tokens)

    def trl_loss(h, w):
        student = (h @ w.t()).view(*labels.shape, -1)  # its forward's logits of the sequences, [S, L, V]
        with torch.no_grad():
            teacher = (ht @ wt.t()).view(*labels.shape, -1)
        if mode["distillation_objective"] == "iw_opd":
            teacher_logprobs = torch.log_softmax(teacher / temperature, dim=-1).gather(-1, labels[..., None])[..., 0]
            return trainer._compute_iw_opd_loss(student, labels, labels, teacher_logprobs,
                                                rollout.view(labels.shape) if rollout is not None else None)
        if mode["loss_top_k"] == 1:
            return trainer._compute_local_sparse_top_1_divergence_loss(student, teacher, labels, labels)
        return trainer.generalized_jsd_loss(student, teacher, labels, beta=mode["beta"], temperature=temperature,
                                            top_k=mode["loss_top_k"])

    settings = iw_opd.IWOPDSettings(mode["distillation_objective"], mode["beta"], mode["loss_top_k"], True)
    rows = iw_opd.KeptRows(labels)

    def kdfast_loss(h, w):
        student, teacher = HeadMap(w, temperature=temperature), HeadMap(wt, temperature=temperature)
        if mode["distillation_objective"] == "iw_opd":
            teacher_logprobs = iw_opd.token_logprobs(ht, teacher, tokens)
            return iw_opd.iw_opd_rows(h, student, tokens, teacher_logprobs, rows, settings, rows.count, rollout)[0]
        return iw_opd.local_divergence_sum(h, student, ht, teacher, tokens, settings) / rows.count

    return head_gradient_calls(hs, ws, {"TRL": trl_loss, "kdfast": kdfast_loss})
