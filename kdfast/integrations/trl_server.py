"""TRL's `ServerDistillationTrainer` (a teacher behind a vLLM server that returns its top-k log-probs per completion
token) on kdfast: with the tail bucket (`loss_add_tail`, TRL's default) every beta's loss is kdfast's sparse
contract, the generalized JSD between the teacher's K + 1 buckets and the student's, computed by
`linear_sparse_distill_loss` from the student's last hidden states, so the student's logits are never built for the
batch. beta = 0: the server's top-k ids; beta > 0: TRL's top-1-plus-actual support (the teacher's top-1 and the
completion's token, the second dropped where they are one token; the actual token alone at beta = 1). Without the
tail (both sides renormalised over the ids) it is not kdfast's contract, and runs as TRL computes it."""

from __future__ import annotations

import functools
import warnings

import torch

from kdfast.integrations.causal_lm import last_hidden_state, sparse_distill_from_hidden
from kdfast.integrations.compiled_loss import check_compile_supported, compiled, entered_model
from kdfast.integrations.sharding import run_through_wrapper
from kdfast.sparse_options import SparseOptions

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # TRL warns that its experimental namespace may change
    try:
        from trl.experimental.server_distillation import ServerDistillationTrainer as _TRLServerDistillationTrainer
    except ImportError as error:
        raise ImportError("kdfast.integrations.trl_server needs a TRL with trl.experimental.server_distillation "
                          "(TRL 1.x)") from error

_TRL_IGNORE_INDEX = -100


class ServerDistillationTrainer(_TRLServerDistillationTrainer):
    """TRL's `ServerDistillationTrainer` (same arguments and config). With `loss_add_tail=True` its loss, the
    generalized JSD with `beta` between the teacher's K + 1 buckets and the student's at `temperature`, per completion
    token, is kdfast's fused sparse loss (tail="bucket", no T² factor, as TRL's); without the tail it is TRL's own."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_compile_supported(self)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # return_outputs asks for the student's logits, which the fused loss exists not to build; TRL's "argmax"
        # reverse-KL token (its config refuses it for a server) is the student's argmax over its full row.
        if not self.loss_add_tail or return_outputs or self.reverse_kl_top_1_mode != "sampled":
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        wrapper, student = entered_model(self, model)  # under torch_compile the loss compiles (compiled_loss.py)
        loss = run_through_wrapper(wrapper, student, functools.partial(self._fused_loss, student), inputs)
        # TRL's server path averages over the batch's own completion tokens, then scales for accumulation itself.
        if self.model.training:
            loss = loss / self.current_gradient_accumulation_steps
        return loss

    def _fused_loss(self, student, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        completion_labels = torch.where(completion_mask.bool(), completion_ids,
                                        torch.full_like(completion_ids, _TRL_IGNORE_INDEX))
        inputs = {**inputs, "input_ids": torch.cat([prompt_ids, completion_ids], dim=1),
                  "attention_mask": torch.cat([prompt_mask, completion_mask], dim=1),
                  "labels": torch.cat([torch.full_like(prompt_ids, _TRL_IGNORE_INDEX), completion_labels], dim=1),
                  "prompt_attention_mask": prompt_mask}
        prompt_length = self._compute_prompt_length(inputs)
        teacher = self._get_teacher_token_logprobs_from_server(inputs, prompt_length)
        length = teacher["topk_logprobs"].shape[1]
        labels = inputs["labels"][:, prompt_length:][:, :length]
        if self.beta == 0:
            ids, logprobs = server_topk_support(teacher)
        else:
            ids, logprobs = top1_actual_support(teacher, inputs["input_ids"][:, prompt_length:][:, :length], labels,
                                                self.beta)
        with self.accelerator.autocast():
            # The server's answer is in hand: the rest (the decoder, the fused loss) is what torch_compile compiles.
            return compiled(self, _student_loss)(student, inputs["input_ids"], inputs["attention_mask"], prompt_length,
                                                 ids, logprobs, labels, self._loss_options())

    def _loss_options(self) -> SparseOptions:
        """TRL's loss as kdfast settings, one record while beta and the temperature stay (a compiled loss's guards
        then hold from step to step)."""
        key = (self.beta, self.temperature)
        if getattr(self, "_options", (None, None))[0] != key:
            self._options = key, SparseOptions(divergence="jsd", beta=self.beta, temperature=self.temperature,
                                               t2_scale=False, ignore_index=_TRL_IGNORE_INDEX, reduction="mean",
                                               tail="bucket")
        return self._options[1]


def _student_loss(student, input_ids, attention_mask, prompt_length, ids, logprobs, labels, options):
    """The fused sparse loss of the completion rows (the server's `ids` and `logprobs` over them)."""
    hidden = last_hidden_state(student, input_ids, attention_mask)
    hidden = hidden[:, prompt_length - 1:-1][:, :ids.shape[1]]
    return sparse_distill_from_hidden(student, hidden, ids, logprobs, labels, options)


def server_topk_support(teacher):
    """beta = 0: the server's top-k ids and log-probs, its -inf padding as kdfast's (id -1, log-prob 0)."""
    logprobs, ids = teacher["topk_logprobs"], teacher["topk_token_ids"]
    held = logprobs > float("-inf")
    return torch.where(held, ids, torch.full_like(ids, -1)), torch.where(held, logprobs, torch.zeros_like(logprobs))


def top1_actual_support(teacher, completion_tokens, labels, beta):
    """beta > 0: TRL's support, the teacher's top-1 id and the completion's actual token (the second -1 where it is
    the top-1, so that the column counts once), or the actual token alone at beta = 1. A row in the loss without the
    log-probs it needs is refused as TRL refuses it; rows out of the loss are padding."""
    required = labels != _TRL_IGNORE_INDEX
    actual_logprobs = teacher["actual_logprobs"]
    _refuse_missing(required & ~torch.isfinite(actual_logprobs), required, "actual-token", "reverse-KL")
    if beta == 1:
        ids, logprobs = completion_tokens[..., None], actual_logprobs[..., None]
    else:
        top1_ids, top1_logprobs = teacher["topk_token_ids"][..., 0], teacher["topk_logprobs"][..., 0]
        _refuse_missing(required & ~torch.isfinite(top1_logprobs), required, "top-1", "forward-KL")
        actual_ids = torch.where(completion_tokens == top1_ids, torch.full_like(completion_tokens, -1),
                                 completion_tokens)
        ids = torch.stack([top1_ids, actual_ids], dim=-1)
        logprobs = torch.stack([top1_logprobs, actual_logprobs], dim=-1)
    ids = torch.where(required[..., None], ids, torch.full_like(ids, -1))
    return ids, torch.where(ids >= 0, logprobs, torch.zeros_like(logprobs))


def _refuse_missing(missing, required, what, used_for):
    # TRL's own message, so that a failing server reads the same under either trainer.
    if missing.any():
        raise ValueError(f"Teacher server is missing {what} logprobs for required {used_for} positions: "
                         f"{int(missing.sum())}/{int(required.sum())}.")
