"""The loss of TRL's ServerDistillationTrainer (trl.experimental.server_distillation: a teacher behind a vLLM server
that returns its top-k log-probs per completion token, and the completion token's own) for `bench_trl.py`: TRL's loss
as its trainer computes it against the loss of kdfast's subclass (kdfast.integrations.trl_server), on the same
served log-probs.

TRL's trainer computes this loss inside its `compute_loss`: the student's whole logits from its head, log_softmax at
T, then its own methods, `_compute_server_forward_kl_loss` (beta = 0, the server's top-k with a tail bucket) or
`_compute_server_sparse_top_1_divergence_loss` (beta > 0, the teacher's top-1 and the completion's token with a
tail bucket; TRL's config asks the server for the top-1 alone then). Those methods are called here on a trainer made
without its `__init__` (which would load a model and connect to a server), holding the four settings they read.
kdfast's subclass runs `linear_sparse_distill_loss` on the hidden states and head over the support its own
`server_topk_support` / `top1_actual_support` build from the same served log-probs, as its `_fused_loss` does.

The served log-probs are the benchmark's teacher head's at T (the server applies the trainer's temperature), the
completion's tokens the benchmark's labels.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from bench_trl_async import importable, teacher_top_k

import kdfast

_TRL_IGNORE_INDEX = -100  # TRL's label for a position out of the loss


def _modules():
    """TRL's server trainer class and kdfast's support builders (ImportError without either)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL warns that its experimental namespace may change
        from trl.experimental.server_distillation import ServerDistillationTrainer

        from kdfast.integrations import trl_server
    return ServerDistillationTrainer, trl_server


def server_loss_available() -> bool:
    return importable(_modules)


def served_top_k(beta: float, top_k: int) -> int:
    """The server's candidates per token as TRL's config allows them: `top_k` at beta = 0, the top-1 above it."""
    return top_k if beta == 0 else 1


def served_logprobs(inputs, top_k: int, temperature: float) -> dict:
    """What TRL's `_get_teacher_token_logprobs_from_server` returns for one sequence of the benchmark's rows:
    `topk_logprobs` / `topk_token_ids` [1, N, K] and `actual_logprobs` [1, N] (the labels' log-probs), float32."""
    ids, logprobs, actual_logprobs = teacher_top_k(inputs, top_k, temperature)
    return {"topk_logprobs": logprobs[None], "topk_token_ids": ids[None], "actual_logprobs": actual_logprobs.T}


def trl_trainer(beta: float, temperature: float, top_k: int):
    """TRL's server trainer without its `__init__`: the settings its loss methods read, as its config sets them."""
    trainer_class, _ = _modules()
    trainer = object.__new__(trainer_class)
    trainer.beta, trainer.temperature, trainer.loss_top_k = beta, temperature, top_k
    trainer.loss_add_tail, trainer.reverse_kl_top_1_mode = True, "sampled"
    return trainer


def server_contenders(inputs, beta: float, args) -> dict:
    """method -> zero-argument callable giving (loss, None, d hidden, d weight): the server trainer's loss at `beta`
    by TRL and by kdfast (the same served log-probs; every row a completion token)."""
    _, trl_server = _modules()
    top_k = served_top_k(beta, args.top_k)
    served = served_logprobs(inputs, top_k, args.temperature)
    labels = inputs["labels"][None]  # [1, N]: one sequence whose completion is every row
    trainer = trl_trainer(beta, args.temperature, top_k)
    hs, ws = inputs["student_hidden"], inputs["student_weight"]

    def trl_loss(h, w):
        student_log_probs = F.log_softmax((h @ w.t())[None] / args.temperature, dim=-1)  # its forward's logits
        if beta > 0:
            return trainer._compute_server_sparse_top_1_divergence_loss(
                teacher_result=served, student_log_probs=student_log_probs, completion_tokens=labels, labels=labels)
        return trainer._compute_server_forward_kl_loss(teacher_result=served, student_log_probs=student_log_probs,
                                                       labels=labels)

    if beta == 0:
        ids, logprobs = trl_server.server_topk_support(served)
    else:
        ids, logprobs = trl_server.top1_actual_support(served, labels, labels, beta)

    def kdfast_loss(h, w):
        return kdfast.linear_sparse_distill_loss(h, w, ids[0], logprobs[0], labels[0], divergence="jsd", beta=beta,
                                                 temperature=args.temperature, t2_scale=False, tail="bucket",
                                                 ignore_index=_TRL_IGNORE_INDEX, reduction="mean")

    return head_gradient_calls(hs, ws, {"TRL": trl_loss, "kdfast": kdfast_loss})


def head_gradient_calls(hs, ws, losses: dict) -> dict:
    """method -> zero-argument callable giving (loss, None, d hidden, d weight) of `losses[method](h, w)` on fresh
    leaves of the student's hidden states `hs` and head `ws`."""
    def call(loss_fn):
        def run():
            h, w = hs.detach().requires_grad_(True), ws.detach().requires_grad_(True)
            loss = loss_fn(h, w)
            return (loss.detach(), None, *torch.autograd.grad(loss, (h, w)))
        return run

    return {method: call(loss_fn) for method, loss_fn in losses.items()}
