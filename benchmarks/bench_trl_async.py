"""The loss of TRL's AsyncDistillationTrainer (trl.experimental.async_distillation: teachers behind vLLM servers that
return their top-k log-probs per completion token, rows routed among several teachers by `teacher_id_idx`) for
`bench_trl.py`: TRL's `_chunked_jsd_loss` against kdfast's drop-in `chunked_jsd_loss`, each called as its trainer
calls it (TRL's 256-row chunks, kdfast's "auto"), on the same candidates.

The candidates are what a server would return for the benchmark's teacher head: its top-k log-probs per row at T = 1,
and the completion's token (the benchmark's labels) beside them where it is not among them, as vLLM's
`prompt_logprobs` always reports it; for beta > 0 narrowed to TRL's top-1-plus-actual support by TRL's own function.
"""

from __future__ import annotations

import warnings

import torch

# TRL's async trainer projects this many rows at a time (its `_CHUNKED_LM_HEAD_CHUNK_SIZE`).
TRL_CHUNK_ROWS = 256
# Rows of the teacher head's logits made at a time while its candidates are picked (setup, not timed).
SETUP_ROWS = 512


def _modules():
    """TRL's async trainer module and kdfast's drop-in for its loss (ImportError without either)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL warns that its experimental namespace may change
        from trl.experimental.async_distillation import async_distillation_trainer as trl_async

        from kdfast.integrations.trl_async import chunked_jsd_loss
    return trl_async, chunked_jsd_loss


def importable(load) -> bool:
    """Whether `load()` finds what a task needs (TRL's experimental trainers come and go between its versions)."""
    try:
        load()
    except ImportError:
        return False
    return True


def async_loss_available() -> bool:
    return importable(_modules)


@torch.no_grad()
def teacher_top_k(inputs, top_k: int, temperature: float = 1.0):
    """The benchmark's teacher head as a server reports it: per row its top-k ids [N, K] and log-probs [N, K] at
    `temperature`, and the log-prob of the row's actual token (the labels) [N, 1], float32."""
    hidden, weight, actual = inputs["teacher_hidden"], inputs["teacher_weight"], inputs["labels"]
    ids, logprobs, actual_logprobs = [], [], []
    for start in range(0, hidden.shape[0], SETUP_ROWS):
        rows = torch.log_softmax((hidden[start:start + SETUP_ROWS] @ weight.t()).float() / temperature, dim=-1)
        top = rows.topk(top_k, dim=-1)
        ids.append(top.indices)
        logprobs.append(top.values)
        actual_logprobs.append(rows.gather(1, actual[start:start + SETUP_ROWS, None]))
    return torch.cat(ids), torch.cat(logprobs), torch.cat(actual_logprobs)


def served_candidates(inputs, top_k: int):
    """(ids [N, K + 1], log-probs [N, K + 1], mask [N, K + 1], actual tokens [N]): the teacher head's top-k at T = 1 and
    the actual token in a last column (masked out where it is among the top-k)."""
    actual = inputs["labels"]
    ids, logprobs, actual_logprobs = teacher_top_k(inputs, top_k)
    listed = (ids == actual[:, None]).any(dim=-1, keepdim=True)
    ids = torch.cat([ids, torch.where(listed, -1, actual[:, None])], dim=1)
    logprobs = torch.cat([logprobs, torch.where(listed, float("-inf"), actual_logprobs)], dim=1)
    return ids, logprobs, ids != -1, actual


def async_contenders(inputs, candidates, beta: float, teachers: int, args) -> dict:
    """method -> zero-argument callable giving (summed loss, summed student entropy, d hidden, d weight): the async
    trainer's loss at `beta` with `teachers` teachers (rows routed round-robin), by TRL and by kdfast."""
    trl_async, chunked_jsd_loss = _modules()
    ids, logprobs, mask, actual = candidates
    if beta != 0:
        ids, logprobs, mask = trl_async._narrow_top1_actual_support(ids, logprobs, actual, mask, beta)
    kept = mask.any(dim=-1)  # TRL's trainer packs the rows with teacher signal to the front and drops the rest
    ids, logprobs, mask = ids[kept], logprobs[kept], mask[kept]
    hs, ws = inputs["student_hidden"][kept], inputs["student_weight"]
    teacher_id_idx = (torch.arange(hs.shape[0], device=hs.device) % teachers) if teachers > 1 else None

    def call(loss_fn, chunk_rows):
        def run():
            h, w = hs.detach().requires_grad_(True), ws.detach().requires_grad_(True)
            loss, _, entropy_sum, _, _ = loss_fn(h, w, None, 1.0, None, ids, logprobs, mask, beta, args.temperature,
                                                 True, teacher_id_idx, teachers, chunk_rows)
            return (loss.detach(), entropy_sum.detach(), *torch.autograd.grad(loss, (h, w)))
        return run

    return {"TRL": call(trl_async._chunked_jsd_loss, TRL_CHUNK_ROWS), "kdfast": call(chunked_jsd_loss, "auto")}
